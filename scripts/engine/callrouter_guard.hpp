/*
 * callrouter_guard: the router's first line of defence inside pjsip.
 *
 * How it works: a pjsip module registered just below the transaction layer
 * (priority PJSIP_MOD_PRIORITY_TSX_LAYER - 1) sees every incoming request
 * before pjsua does. pjsua2 exposes no per-request hook early enough: pjsua
 * sends "100 Trying" and allocates a media channel before on_incoming_call(),
 * and answers MESSAGE with 200 before on_instant_message(). So the policy that
 * must act before pjsua lives here, in C++, compiled into the SWIG module:
 *
 *  - source allowlist: a request from an address outside the allowed networks
 *    (the static sip.inbound.allowed_sources and the live trunk networks) is
 *    dropped silently (default) or answered statelessly with a configured
 *    code, unless it belongs to a live dialog (the runtime's BYE, say) or is an
 *    INVITE to the Contact user a trunk registration advertised;
 *  - an INVITE from a trunk with inbound_auth is challenged (407, RFC 3261 s22.3)
 *    and refused 403 when its credentials are wrong;
 *  - methods a router must not act on (REFER, MESSAGE, SUBSCRIBE, NOTIFY,
 *    PUBLISH, REGISTER) get 405 with an Allow header (RFC 3261 s21.4.6);
 *  - an INVITE carrying Replaces (RFC 3891) is refused with 403;
 *  - a new INVITE that would take one of the last reserved engine call slots
 *    gets 503 + Retry-After instead of pjsua's own 486 Busy Here;
 *  - more than sip.inbound.flood_limit new requests a second from one source address
 *    ban it for sip.inbound.flood_ban_seconds: its new requests are dropped (never
 *    in-dialog requests of calls in progress);
 *  - out-of-dialog OPTIONS is answered here, with Allow/Accept/Supported trimmed to
 *    what the router does (no Allow-Events: SUBSCRIBE and REFER are refused); while
 *    the router drains it gets 503 + Retry-After instead, so a load balancer probing
 *    with OPTIONS (Kamailio's dispatcher) stops sending new calls here;
 *  - a request larger than sip.max_message_bytes gets 513 Message Too Large
 *    (RFC 3261 s21.5.14), a response that large is dropped; a TCP message larger
 *    than the transport's buffer (PJSIP_MAX_PKT_LEN) reaches the drop-data
 *    callback and gets 513 there when its Via/From/To/Call-ID/CSeq are readable.
 *
 * A second module, registered last, answers what nobody else took (pjsua leaves
 * those unanswered): 481 for in-dialog methods without a dialog, 501 + Allow for
 * methods we do not implement.
 *
 * pjsip's parser is liberal; the guard answers 400 to what RFC 4475 s3.1.2 calls
 * invalid but pjsip accepts (CSeq method mismatch, several Content-Length headers,
 * whitespace inside <addr-spec>, an unquoted display name that is not a token).
 * A request pjsip cannot parse at all is answered statelessly too (transport
 * drop-data callback): 416 for an unknown Request-URI scheme, else 400. The same
 * callback answers a CRLFCRLF keep-alive ping on TCP with a CRLF pong (RFC 5626).
 *
 * It also removes the refused methods and extensions from the endpoint's
 * Allow and Supported capabilities, so pjsua never advertises them.
 *
 * Threading: every function below is called on the SIP thread (the one
 * thread that owns the pjsua2 endpoint), except the crGuardTrunks* ones, which
 * publish an immutable snapshot (see the implementation); the counters are
 * atomics so a metrics scrape may read them from anywhere.
 */
#ifndef CALLROUTER_GUARD_HPP
#define CALLROUTER_GUARD_HPP
#include <string>

int crGuardInstall();
void crGuardClearNetworks();
int crGuardAllowNetwork(const std::string &addr, unsigned prefix);
void crGuardSetSourceRejectCode(int code);
void crGuardSetSlotReserve(unsigned reserve);
void crGuardSetMaxMessageBytes(unsigned bytes);
unsigned long crGuardTooLarge();
unsigned long crGuardKeepalivePongs();
unsigned long crGuardOptionsAnswered();
/* Draining: out-of-dialog OPTIONS gets 503 with Retry-After: `retry_after` seconds.
 * Safe from any thread (an atomic flag). */
void crGuardSetDraining(bool draining, unsigned retry_after);
unsigned long crGuardOptionsDraining();
/* Per-source flood control: `limit_per_second` new requests a second (0 = off), then
 * the source's new requests are dropped for `ban_seconds`. */
void crGuardSetFloodControl(unsigned limit_per_second, unsigned ban_seconds);
unsigned long crGuardFloodDropped();
unsigned long crGuardFloodBans();
unsigned crGuardFloodTracked();
/* Source addresses banned since the last call, space-separated (each reported once). */
std::string crGuardTakeNewBans();
unsigned long crGuardDroppedSources();
unsigned long crGuardRefusedMethods();
unsigned long crGuardRefusedReplaces();
unsigned long crGuardEngineFull();
unsigned long crGuardMalformed();
unsigned long crGuardUnparsable();

/* Trunks (issue 11): the live part of the allow-list, swapped in whole. Begin, add the
 * entries, Publish: the next request sees the new table. Safe from any thread. */
void crGuardTrunksBegin();
int crGuardTrunksAddNetwork(const std::string &addr, unsigned prefix, const std::string &trunk);
void crGuardTrunksAddAuth(const std::string &trunk, const std::string &username,
                          const std::string &password);
void crGuardTrunksAddRegistrationUser(const std::string &user, const std::string &trunk);
void crGuardTrunksPublish();
/* The trunk an INVITE came in on: the one whose networks hold `source` ("ip:port",
 * "[v6]:port"), else the registration that advertised the Request-URI `user`, else "". */
std::string crGuardTrunkFor(const std::string &source, const std::string &user);
/* 1 when `user` is the Contact user of a trunk registration. */
int crGuardIsRegistrationUser(const std::string &user);
unsigned long crGuardAuthChallenged();
unsigned long crGuardAuthFailed();
unsigned long crGuardAuthOk();
unsigned long crGuardTrunkAllowed();

#endif
