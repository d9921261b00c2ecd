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
 *    is dropped silently (default) or answered statelessly with a configured
 *    code, unless it belongs to a live dialog (the runtime's BYE, say);
 *  - methods a router must not act on (REFER, MESSAGE, SUBSCRIBE, NOTIFY,
 *    PUBLISH, REGISTER) get 405 with an Allow header (RFC 3261 s21.4.6);
 *  - an INVITE carrying Replaces (RFC 3891) is refused with 403;
 *  - a new INVITE that would take one of the last reserved engine call slots
 *    gets 503 + Retry-After instead of pjsua's own 486 Busy Here.
 *
 * A second module, registered last, answers what nobody else took (pjsua leaves
 * those unanswered): 481 for in-dialog methods without a dialog, 501 + Allow for
 * methods we do not implement.
 *
 * pjsip's parser is liberal; the guard answers 400 to what RFC 4475 s3.1.2 calls
 * invalid but pjsip accepts (CSeq method mismatch, several Content-Length headers,
 * whitespace inside <addr-spec>, an unquoted display name that is not a token).
 * A request pjsip cannot parse at all is answered statelessly too (transport
 * drop-data callback): 416 for an unknown Request-URI scheme, else 400.
 *
 * It also removes the refused methods and extensions from the endpoint's
 * Allow and Supported capabilities, so pjsua never advertises them.
 *
 * Threading: every function below is called on the SIP thread (the one
 * thread that owns the pjsua2 endpoint); the counters are atomics so a
 * metrics scrape may read them from anywhere.
 */
#ifndef CALLROUTER_GUARD_HPP
#define CALLROUTER_GUARD_HPP
#include <string>

int crGuardInstall();
void crGuardClearNetworks();
int crGuardAllowNetwork(const std::string &addr, unsigned prefix);
void crGuardSetSourceRejectCode(int code);
void crGuardSetSlotReserve(unsigned reserve);
unsigned long crGuardDroppedSources();
unsigned long crGuardRefusedMethods();
unsigned long crGuardRefusedReplaces();
unsigned long crGuardEngineFull();
unsigned long crGuardMalformed();
unsigned long crGuardUnparsable();

#endif
