"""The SIP adapter: the only package that imports pjsua2.

``engine.SipEngine`` owns the pjsua2 endpoint on one thread; ``legs`` holds the
pjsua2 ``Call`` subclasses that turn callbacks into domain events; ``info``
describes the built engine (version, compiled limits).
"""
