"""The SIP adapter: the only package that imports pjsua2.

Bound to pjsua2: ``engine.SipEngine`` owns the endpoint on one thread, ``pjstack``
carries the adapter's requests out as pjsua2 calls, ``legs`` holds the ``Call``
subclass that forwards callbacks, ``info`` describes the built engine.

Free of pjsua2 (unit-tested without it): ``adapter.CallAdapter`` (pump, timers, leg
lifecycle, the callback guard), the seam it talks through (``stack.SipStack``), its
in-memory fake (``fake.FakeStack``) and the trunk account cache (``trunks``).
"""
