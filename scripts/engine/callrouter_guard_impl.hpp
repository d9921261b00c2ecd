/* Implementation of callrouter_guard.hpp; see that file for how it works. */
#include "callrouter_guard.hpp"
#include "callrouter_guard_text.hpp"  /* the pure string functions */
#include <pjsip.h>
#include <pjsip_ua.h>
#include <pjsua-lib/pjsua.h>
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

struct CrNet {
    int af;
    unsigned char addr[16];
    unsigned prefix;
};

std::vector<CrNet> cr_nets;
int cr_reject_code = 0;          /* 0 = drop silently */
unsigned cr_slot_reserve = 0;
unsigned cr_max_message = PJSIP_MAX_PKT_LEN;  /* sip.max_message_bytes */
std::atomic<unsigned long> cr_dropped(0), cr_refused(0), cr_replaces(0), cr_full(0);
std::atomic<unsigned long> cr_too_large(0), cr_pongs(0), cr_flood_dropped(0), cr_flood_bans(0);
std::atomic<unsigned long> cr_options(0), cr_options_draining(0);
std::atomic<bool> cr_draining(false);
/* Reason phrases of a 503 that means "this router takes no new call, another may": a
 * balancer in front (deploy/kamailio) fails over on these and passes any other 503 (a
 * runtime's failure, which every router would meet) to the caller. The Python side
 * (service.NO_ROOM_PHRASES) uses the same two. */
const char *const CR_DRAINING = "Draining";
const char *const CR_OVER_CAPACITY = "Over Capacity";
std::atomic<unsigned> cr_drain_retry_after(5);

/* ---- per-source flood control -----------------------------------------------------
 * More than `cr_flood_limit` new requests (out of dialog, ACK and CANCEL excepted) in
 * one second from one source address bans that address for `cr_flood_ban_ms`: its new
 * requests are dropped before pjsua allocates anything. In-dialog requests of calls in
 * progress are never counted nor dropped. A fixed one-second window per address, kept
 * in a map that is pruned of idle addresses so spoofed sources cannot grow it without
 * bound. New bans are queued for the SIP adapter, which logs each once. */
struct CrFlood {
    pj_uint32_t window_start;  /* ms tick of the current one-second window */
    unsigned count;            /* new requests in that window */
    pj_uint32_t banned_until;  /* ms tick; 0 = not banned */
};
unsigned cr_flood_limit = 0;           /* 0 = off */
pj_uint32_t cr_flood_ban_ms = 60000;
std::unordered_map<std::string, CrFlood> cr_flood;
std::vector<std::string> cr_new_bans;
pj_uint32_t cr_flood_pruned_at = 0;
const std::size_t CR_FLOOD_MAX_SOURCES = 65536;
std::atomic<unsigned long> cr_malformed_count(0), cr_unparsable(0);
pjsip_module cr_mod, cr_fallback_mod;
bool cr_installed = false;

/* ---- trunks: the live part of the allow-list ---------------------------------------
 * The API changes trunks while the SIP thread routes, so the trunk table is an immutable
 * snapshot behind a shared_ptr (RCU style): a change builds a new table (staging) and
 * publishes it with one pointer swap under a mutex; a reader copies the pointer under the
 * same mutex and reads the table without holding it. Per request that is one lock and
 * one reference count, then a scan over the trunk networks (most specific first). */
struct CrTrunkNet {
    int af;
    unsigned char addr[16];
    unsigned prefix;
    std::string trunk;
};
struct CrTrunks {
    std::vector<CrTrunkNet> nets;
    /* trunk id -> digest (username, password) for trunks with inbound_auth */
    std::unordered_map<std::string, std::pair<std::string, std::string>> auth;
    /* Request-URI user a registration advertised in its Contact -> trunk id */
    std::unordered_map<std::string, std::string> users;
};
std::mutex cr_trunks_mu, cr_staging_mu;
std::shared_ptr<const CrTrunks> cr_trunks = std::make_shared<CrTrunks>();
CrTrunks cr_staging;
std::atomic<unsigned long> cr_auth_challenged(0), cr_auth_failed(0), cr_auth_ok(0);
std::atomic<unsigned long> cr_trunk_allowed(0), cr_registration_allowed(0);
pjsip_auth_srv cr_auth_srv;  /* initialised once at install (its realm lives in a pool) */
bool cr_auth_ready = false;
const char *const CR_REALM = "callrouter";
/* The credentials pjsip_auth_srv_verify checks against (the SIP thread only). */
const std::pair<std::string, std::string> *cr_auth_current = NULL;

std::shared_ptr<const CrTrunks> cr_trunks_now() {
    std::lock_guard<std::mutex> hold(cr_trunks_mu);
    return cr_trunks;
}

bool cr_parse_net(const std::string &addr, unsigned prefix, int *af, unsigned char *out) {
    std::memset(out, 0, 16);
    pj_str_t s = pj_str((char *)addr.c_str());
    if (pj_inet_pton(pj_AF_INET(), &s, out) == PJ_SUCCESS) {
        *af = pj_AF_INET();
        return prefix <= 32;
    }
    if (pj_inet_pton(pj_AF_INET6(), &s, out) == PJ_SUCCESS) {
        *af = pj_AF_INET6();
        return prefix <= 128;
    }
    return false;
}

bool cr_prefix_match(const unsigned char *a, const unsigned char *b, unsigned bits) {
    unsigned bytes = bits / 8, rest = bits % 8;
    if (std::memcmp(a, b, bytes) != 0) return false;
    if (rest == 0) return true;
    unsigned char mask = (unsigned char)(0xFF << (8 - rest));
    return (a[bytes] & mask) == (b[bytes] & mask);
}

void cr_respond(pjsip_rx_data *rdata, int code, const char *hname, const char *hvalue,
                const char *reason = NULL);

/* The source's family and raw address; ::ffff:a.b.c.d (dual-stack sockets) as IPv4. */
const unsigned char *cr_source_raw(const pj_sockaddr *src, int *af, unsigned char *mapped) {
    *af = src->addr.sa_family;
    const unsigned char *raw = (const unsigned char *)pj_sockaddr_get_addr(src);
    if (*af == pj_AF_INET6()) {
        static const unsigned char v4prefix[12] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff};
        if (std::memcmp(raw, v4prefix, 12) == 0) {
            std::memcpy(mapped, raw + 12, 4);
            *af = pj_AF_INET();
            return mapped;
        }
    }
    return raw;
}

bool cr_source_allowed(const pj_sockaddr *src) {
    int af;
    unsigned char mapped[4];
    const unsigned char *raw = cr_source_raw(src, &af, mapped);
    for (const CrNet &n : cr_nets) {
        if (n.af == af && cr_prefix_match(raw, n.addr, n.prefix)) return true;
    }
    return false;
}

/* The trunk whose networks hold the source (most specific first), or NULL. */
const std::string *cr_trunk_of(const CrTrunks &trunks, const pj_sockaddr *src) {
    int af;
    unsigned char mapped[4];
    const unsigned char *raw = cr_source_raw(src, &af, mapped);
    for (const CrTrunkNet &n : trunks.nets) {
        if (n.af == af && cr_prefix_match(raw, n.addr, n.prefix)) return &n.trunk;
    }
    return NULL;
}

/* The trunk of the registration an INVITE's Request-URI user was advertised by, or NULL:
 * a provider delivers calls to the Contact the router registered. */
const std::string *cr_registration_of(const CrTrunks &trunks, pjsip_rx_data *rdata) {
    if (trunks.users.empty()) return NULL;
    pjsip_uri *uri = rdata->msg_info.msg->line.req.uri;
    if (!PJSIP_URI_SCHEME_IS_SIP(uri) && !PJSIP_URI_SCHEME_IS_SIPS(uri)) return NULL;
    const pjsip_sip_uri *sip = (const pjsip_sip_uri *)pjsip_uri_get_uri(uri);
    auto found = trunks.users.find(std::string(sip->user.ptr, (std::size_t)sip->user.slen));
    return found == trunks.users.end() ? NULL : &found->second;
}

pj_status_t cr_auth_lookup(pj_pool_t *pool, const pj_str_t *realm, const pj_str_t *acc_name,
                           pjsip_cred_info *cred) {
    PJ_UNUSED_ARG(realm);
    if (cr_auth_current == NULL) return PJ_ENOTFOUND;
    const std::string &user = cr_auth_current->first;
    if ((std::size_t)acc_name->slen != user.size() ||
        std::memcmp(acc_name->ptr, user.data(), user.size()) != 0)
        return PJ_ENOTFOUND;
    pj_bzero(cred, sizeof(*cred));
    pj_strdup2(pool, &cred->realm, CR_REALM);
    pj_strdup2(pool, &cred->scheme, "digest");
    pj_strdup2(pool, &cred->username, user.c_str());
    pj_strdup2(pool, &cred->data, cr_auth_current->second.c_str());
    cred->data_type = PJSIP_CRED_DATA_PLAIN_PASSWD;
    return PJ_SUCCESS;
}

/* A digest-authenticated trunk (RFC 3261 s22.3): an INVITE without credentials gets 407
 * with a challenge, one with wrong credentials 403. True when it was answered here. */
bool cr_challenged(pjsip_rx_data *rdata, const std::pair<std::string, std::string> &creds) {
    if (!cr_auth_ready) {  /* never challenged: refuse rather than let it through */
        cr_respond(rdata, PJSIP_SC_SERVICE_UNAVAILABLE, NULL, NULL);
        return true;
    }
    int code = 0;
    cr_auth_current = &creds;
    pj_status_t st = pjsip_auth_srv_verify(&cr_auth_srv, rdata, &code);
    cr_auth_current = NULL;
    if (st == PJ_SUCCESS) {
        cr_auth_ok++;
        return false;
    }
    if (code != PJSIP_SC_PROXY_AUTHENTICATION_REQUIRED) {
        cr_auth_failed++;
        cr_respond(rdata, PJSIP_SC_FORBIDDEN, NULL, NULL);
        return true;
    }
    cr_auth_challenged++;
    pjsip_endpoint *endpt = pjsua_get_pjsip_endpt();
    pjsip_tx_data *tdata;
    if (pjsip_endpt_create_response(endpt, rdata, code, NULL, &tdata) != PJ_SUCCESS) return true;
    pjsip_response_addr addr;
    if (pjsip_auth_srv_challenge(&cr_auth_srv, NULL, NULL, NULL, PJ_FALSE, tdata) != PJ_SUCCESS ||
        pjsip_get_response_addr(tdata->pool, rdata, &addr) != PJ_SUCCESS ||
        pjsip_endpt_send_response(endpt, &addr, tdata, NULL, NULL) != PJ_SUCCESS)
        pjsip_tx_data_dec_ref(tdata);
    return true;
}

/* Tick arithmetic in unsigned 32-bit ms: wraps every 49 days, compared by difference. */
bool cr_tick_before(pj_uint32_t a, pj_uint32_t b) { return (pj_int32_t)(a - b) < 0; }

void cr_flood_prune(pj_uint32_t now) {
    if (now - cr_flood_pruned_at < 1000 && cr_flood.size() < CR_FLOOD_MAX_SOURCES) return;
    cr_flood_pruned_at = now;
    for (auto it = cr_flood.begin(); it != cr_flood.end();) {
        bool banned = it->second.banned_until && cr_tick_before(now, it->second.banned_until);
        bool idle = now - it->second.window_start > 2000;
        it = (!banned && idle) ? cr_flood.erase(it) : std::next(it);
    }
}

/* True when a new request from this source must be dropped. */
bool cr_flooding(const pjsip_rx_data *rdata) {
    if (cr_flood_limit == 0) return false;
    pj_time_val t;
    pj_gettickcount(&t);
    pj_uint32_t now = (pj_uint32_t)PJ_TIME_VAL_MSEC(t);
    cr_flood_prune(now);
    if (cr_flood.size() >= CR_FLOOD_MAX_SOURCES) return false;  /* pruning could not help */
    const pj_sockaddr *src = &rdata->pkt_info.src_addr;
    std::string key((const char *)pj_sockaddr_get_addr(src),
                    (std::size_t)pj_sockaddr_get_addr_len(src));
    CrFlood &f = cr_flood[key];
    if (f.banned_until) {
        if (cr_tick_before(now, f.banned_until)) return true;
        f.banned_until = 0;
        f.count = 0;
        f.window_start = now;
    }
    if (f.count == 0 || now - f.window_start >= 1000) {
        f.window_start = now;
        f.count = 0;
    }
    if (++f.count <= cr_flood_limit) return false;
    f.banned_until = now + cr_flood_ban_ms;
    if (f.banned_until == 0) f.banned_until = 1;
    cr_flood_bans++;
    if (cr_new_bans.size() < 1024) cr_new_bans.push_back(rdata->pkt_info.src_name);
    return true;
}

bool cr_in_live_dialog(pjsip_rx_data *rdata) {
    /* RFC 3261 s12.2: an in-dialog request carries the To tag we gave. */
    if (rdata->msg_info.to == NULL || rdata->msg_info.to->tag.slen == 0) return false;
    pjsip_dialog *dlg = pjsip_ua_find_dialog(&rdata->msg_info.cid->id,
                                             &rdata->msg_info.to->tag,
                                             &rdata->msg_info.from->tag, PJ_FALSE);
    return dlg != NULL;
}

void cr_respond(pjsip_rx_data *rdata, int code, const char *hname, const char *hvalue,
                const char *reason) {
    if (rdata->msg_info.msg->line.req.method.id == PJSIP_ACK_METHOD) return;
    pjsip_hdr hdrs;
    pj_list_init(&hdrs);
    pj_str_t name, value;
    if (hname) {
        name = pj_str((char *)hname);
        value = pj_str((char *)hvalue);
        pjsip_generic_string_hdr *h =
            pjsip_generic_string_hdr_create(rdata->tp_info.pool, &name, &value);
        pj_list_push_back(&hdrs, h);
    }
    pj_str_t text = pj_str((char *)(reason ? reason : ""));
    pjsip_endpt_respond_stateless(pjsua_get_pjsip_endpt(), rdata, code, reason ? &text : NULL,
                                  hname ? &hdrs : NULL, NULL);
}

void cr_respond_reason(pjsip_rx_data *rdata, int code, const char *reason) {
    pj_str_t text = pj_str((char *)reason);
    pjsip_endpt_respond_stateless(pjsua_get_pjsip_endpt(), rdata, code, &text, NULL, NULL);
}

/* ---- checks pjsip's liberal parser lets through (RFC 4475 s3.1.2) ---------------- */

const char *cr_malformed(pjsip_rx_data *rdata) {
    const pjsip_method *m = &rdata->msg_info.msg->line.req.method;
    /* RFC 3261 s8.1.1.5: the CSeq method matches the request method. */
    if (pjsip_method_cmp(m, &rdata->msg_info.cseq->method) != 0)
        return "CSeq method does not match the request";
    int content_lengths = 0;
    for (const auto &h : cr_raw_headers(rdata->msg_info.msg_buf, rdata->msg_info.len)) {
        if (h.first == "content-length" || h.first == "l") ++content_lengths;
        if (h.first == "from" || h.first == "f" || h.first == "to" || h.first == "t") {
            const char *why = cr_bad_name_addr(h.second);
            if (why) return why;
        }
    }
    if (content_lengths > 1) return "more than one Content-Length";
    return NULL;
}

/* ---- requests pjsip could not parse --------------------------------------------- */
/* pjsip drops an unparsable message silently. For a request whose Via, From, To,
 * Call-ID and CSeq lines can still be read, answer statelessly instead: 416 when the
 * Request-URI scheme is not sip/sips/tel (RFC 3261 s8.2.2.1), else 400 (s21.4.1). */

/* The rx_data a UDP datagram was read into. pjsip reads one datagram per rx_data into
 * pkt_info.packet and skips leading CR/LF before parsing (RFC 5626 keep-alives), so
 * `data` is `packet + k` where the k bytes before it are CR/LF and the datagram was
 * k + len bytes long. Trying k = 0, 1, ... over CR/LF bytes only, the first candidate
 * whose transport and length agree is the rx_data: every candidate tried lies inside
 * it (k never passes the true offset), so nothing outside it is read. */
pjsip_rx_data *cr_datagram_rdata(const pjsip_tp_dropped_data *dd) {
    const char *data = (const char *)dd->data;
    for (std::size_t k = 0; k <= PJSIP_MAX_PKT_LEN; ++k) {
        pjsip_rx_data *rdata = (pjsip_rx_data *)(data - k - offsetof(pjsip_rx_data, pkt_info.packet));
        if (rdata->tp_info.transport == dd->tp && rdata->pkt_info.len >= 0 &&
            (std::size_t)rdata->pkt_info.len == k + dd->len)
            return rdata;
        if (k == PJSIP_MAX_PKT_LEN || (data[-(long)k - 1] != '\r' && data[-(long)k - 1] != '\n'))
            return NULL;
    }
    return NULL;
}

void cr_send_raw(pjsip_transport *tp, const pj_sockaddr *dst, int dst_len,
                 const std::string &data) {
    pjsip_tpselector sel;
    pj_bzero(&sel, sizeof(sel));
    sel.type = PJSIP_TPSELECTOR_TRANSPORT;
    sel.u.transport = tp;
    pjsip_tpmgr_send_raw(pjsip_endpt_get_tpmgr(pjsua_get_pjsip_endpt()),
                         (pjsip_transport_type_e)tp->key.type, &sel, NULL,
                         data.data(), data.size(), dst, dst_len, NULL, NULL);
}

/* What pjsip's transport manager drops before parsing or cannot parse:
 *  - leading CR/LF (PJ_EIGNORED): on TCP a CRLFCRLF ping gets its CRLF pong
 *    (RFC 5626 s3.5.1); on UDP nothing is sent (s4.4.1 uses STUN there);
 *  - an unparsable request (PJSIP_EINVALIDMSG): 400/405/416 when readable;
 *  - a TCP message beyond PJSIP_MAX_PKT_LEN (PJSIP_ERXOVERFLOW): 513 when readable.
 *    pjsip reports the length the message claims, not what is in the buffer. */
void cr_on_dropped(pjsip_tp_dropped_data *dd) {
    if (dd->tp == NULL || dd->data == NULL) return;
    bool reliable = (dd->tp->flag & PJSIP_TRANSPORT_RELIABLE) != 0;
    if (dd->status == PJ_EIGNORED) {
        std::string dropped((const char *)dd->data, dd->len);
        if (reliable && dropped.find("\r\n\r\n") != std::string::npos) {
            cr_pongs++;
            cr_send_raw(dd->tp, &dd->tp->key.rem_addr, dd->tp->addr_len, "\r\n");
        }
        return;
    }
    bool overflow = dd->status == PJSIP_ERXOVERFLOW;
    if (dd->status != PJSIP_EINVALIDMSG && !overflow) return;
    std::size_t len = std::min<std::size_t>(dd->len, PJSIP_MAX_PKT_LEN);
    std::string response = cr_unparsable_response((const char *)dd->data, len, overflow);
    if (overflow) cr_too_large++;
    if (response.empty()) return;
    pj_sockaddr dst;
    int dst_len;
    if (reliable) {
        dst = dd->tp->key.rem_addr;
        dst_len = dd->tp->addr_len;
    } else {
        pjsip_rx_data *rdata = cr_datagram_rdata(dd);
        if (rdata == NULL) return;
        dst = rdata->pkt_info.src_addr;
        dst_len = rdata->pkt_info.src_addr_len;
    }
    /* the source policy applies here too */
    if (!cr_source_allowed(&dst) && cr_trunk_of(*cr_trunks_now(), &dst) == NULL) return;
    if (!overflow) cr_unparsable++;
    cr_send_raw(dd->tp, &dst, dst_len, response);
}

/* RFC 2543 peers may send an INVITE without Contact (RFC 4475 s3.4.1); pjsip's dialog
 * layer needs one. Use the address the INVITE came from: what a NAT-aware UAS would
 * use for in-dialog requests anyway. */
void cr_repair_contact(pjsip_rx_data *rdata) {
    if (pjsip_msg_find_hdr(rdata->msg_info.msg, PJSIP_H_CONTACT, NULL) != NULL) return;
    char uri[PJ_INET6_ADDRSTRLEN + 64];
    const char *tp = (rdata->tp_info.transport->flag & PJSIP_TRANSPORT_RELIABLE) ? "tcp" : "udp";
    bool v6 = std::strchr(rdata->pkt_info.src_name, ':') != NULL;
    pj_ansi_snprintf(uri, sizeof(uri), "<sip:%s%s%s:%d;transport=%s>", v6 ? "[" : "",
                     rdata->pkt_info.src_name, v6 ? "]" : "", rdata->pkt_info.src_port, tp);
    pj_str_t name = pj_str((char *)"Contact");
    pj_str_t value = pj_str(uri);
    pjsip_contact_hdr *contact = (pjsip_contact_hdr *)
        pjsip_parse_hdr(rdata->tp_info.pool, &name, value.ptr, value.slen, NULL);
    if (contact != NULL) pjsip_msg_add_hdr(rdata->msg_info.msg, (pjsip_hdr *)contact);
}

/* Out-of-dialog OPTIONS (RFC 3261 s11.2): 200 with what the router really does. pjsua's
 * own answer also lists Allow-Events (presence, dialog, message-summary, refer) and the
 * presence bodies in Accept, although SUBSCRIBE and REFER are refused. The capability
 * headers are trimmed at install (cr_strip_capability in crGuardInstall), so INVITE responses agree. */
void cr_answer_options(pjsip_rx_data *rdata) {
    pjsip_endpoint *endpt = pjsua_get_pjsip_endpt();
    pjsip_tx_data *tdata;
    cr_options++;
    if (pjsip_endpt_create_response(endpt, rdata, PJSIP_SC_OK, NULL, &tdata) != PJ_SUCCESS)
        return;
    const int types[] = {PJSIP_H_ALLOW, PJSIP_H_ACCEPT, PJSIP_H_SUPPORTED};
    for (int htype : types) {
        const pjsip_hdr *cap = pjsip_endpt_get_capability(endpt, htype, NULL);
        if (cap != NULL)
            pjsip_msg_add_hdr(tdata->msg, (pjsip_hdr *)pjsip_hdr_clone(tdata->pool, cap));
    }
    pjsip_response_addr addr;
    if (pjsip_get_response_addr(tdata->pool, rdata, &addr) != PJ_SUCCESS ||
        pjsip_endpt_send_response(endpt, &addr, tdata, NULL, NULL) != PJ_SUCCESS)
        pjsip_tx_data_dec_ref(tdata);
}

bool cr_is_refused_method(const pjsip_method *m) {
    for (const char *name : CR_REFUSED) {
        pj_str_t s = pj_str((char *)name);
        if (pj_stricmp(&m->name, &s) == 0) return true;
    }
    return false;
}

pj_bool_t cr_on_rx_request(pjsip_rx_data *rdata) {
    const pjsip_method *m = &rdata->msg_info.msg->line.req.method;
    bool initial_request = rdata->msg_info.to == NULL || rdata->msg_info.to->tag.slen == 0;
    bool initial_invite = m->id == PJSIP_INVITE_METHOD && initial_request;
    bool static_allowed = cr_source_allowed(&rdata->pkt_info.src_addr);
    std::shared_ptr<const CrTrunks> trunks;
    const std::string *trunk = NULL;
    if (!static_allowed || initial_invite) {
        trunks = cr_trunks_now();
        trunk = cr_trunk_of(*trunks, &rdata->pkt_info.src_addr);
        if (trunk == NULL && m->id == PJSIP_INVITE_METHOD) trunk = cr_registration_of(*trunks, rdata);
    }
    if (!static_allowed && trunk == NULL && !cr_in_live_dialog(rdata)) {
        cr_dropped++;
        if (cr_reject_code) cr_respond(rdata, cr_reject_code, NULL, NULL);
        return PJ_TRUE;
    }
    if (!static_allowed && trunk != NULL && initial_invite) cr_trunk_allowed++;
    /* A To tag that matches no dialog does not make a request in-dialog. */
    if (m->id != PJSIP_ACK_METHOD && m->id != PJSIP_CANCEL_METHOD &&
        (initial_request || !cr_in_live_dialog(rdata)) && cr_flooding(rdata)) {
        cr_flood_dropped++;
        return PJ_TRUE;
    }
    /* RFC 3261 s21.5.14: larger than we are willing to handle. Checked before the
     * raw-header scan below, whose cost grows with the message. */
    if ((unsigned)rdata->msg_info.len > cr_max_message) {
        cr_too_large++;
        cr_respond(rdata, PJSIP_SC_MESSAGE_TOO_LARGE, NULL, NULL);
        return PJ_TRUE;
    }
    if (m->id != PJSIP_ACK_METHOD) {
        const char *why = cr_malformed(rdata);
        if (why != NULL) {
            cr_malformed_count++;
            cr_respond_reason(rdata, PJSIP_SC_BAD_REQUEST, why);
            return PJ_TRUE;
        }
    }
    if (cr_is_refused_method(m)) {
        cr_refused++;
        cr_respond(rdata, PJSIP_SC_METHOD_NOT_ALLOWED, "Allow", CR_ALLOW);
        return PJ_TRUE;
    }
    if (m->id == PJSIP_OPTIONS_METHOD && initial_request) {
        if (cr_draining.load()) {
            /* A draining router tells the balancer's probe it takes no new calls. */
            char retry[16];
            pj_ansi_snprintf(retry, sizeof retry, "%u", cr_drain_retry_after.load());
            cr_options_draining++;
            cr_respond(rdata, PJSIP_SC_SERVICE_UNAVAILABLE, "Retry-After", retry, CR_DRAINING);
        } else {
            cr_answer_options(rdata);
        }
        return PJ_TRUE;
    }
    if (m->id != PJSIP_INVITE_METHOD) return PJ_FALSE;
    cr_repair_contact(rdata);
    pj_str_t replaces = pj_str((char *)"Replaces");
    if (pjsip_msg_find_hdr_by_name(rdata->msg_info.msg, &replaces, NULL)) {
        cr_replaces++;
        cr_respond(rdata, PJSIP_SC_FORBIDDEN, NULL, NULL);
        return PJ_TRUE;
    }
    if (initial_invite && trunk != NULL) {
        auto creds = trunks->auth.find(*trunk);
        if (creds != trunks->auth.end() && cr_challenged(rdata, creds->second)) return PJ_TRUE;
    }
    bool initial = rdata->msg_info.to->tag.slen == 0;
    if (initial && cr_slot_reserve &&
        pjsua_call_get_count() + cr_slot_reserve >= pjsua_call_get_max_count()) {
        cr_full++;
        cr_respond(rdata, PJSIP_SC_SERVICE_UNAVAILABLE, "Retry-After", "5", CR_OVER_CAPACITY);
        return PJ_TRUE;
    }
    return PJ_FALSE;
}

/* A response above sip.max_message_bytes is dropped (there is nobody to answer). */
pj_bool_t cr_on_rx_response(pjsip_rx_data *rdata) {
    if ((unsigned)rdata->msg_info.len <= cr_max_message) return PJ_FALSE;
    cr_too_large++;
    return PJ_TRUE;
}

/* Requests no other module took: pjsua leaves these unanswered. RFC 3261 s12.2.2: a
 * request for a dialog that does not exist gets 481; s8.2.1: a method we do not
 * implement gets 501 with Allow. A stray ACK is absorbed (never answered, s17.2.3). */
pj_bool_t cr_on_rx_unhandled(pjsip_rx_data *rdata) {
    const pjsip_method *m = &rdata->msg_info.msg->line.req.method;
    static const char *const dialog_methods[] = {"BYE", "INFO", "UPDATE", "PRACK", "CANCEL"};
    if (m->id == PJSIP_ACK_METHOD) return PJ_TRUE;
    for (const char *name : dialog_methods) {
        pj_str_t s = pj_str((char *)name);
        if (pj_stricmp(&m->name, &s) == 0) {
            cr_respond(rdata, PJSIP_SC_CALL_TSX_DOES_NOT_EXIST, NULL, NULL);
            return PJ_TRUE;
        }
    }
    cr_respond(rdata, PJSIP_SC_NOT_IMPLEMENTED, "Allow", CR_ALLOW);
    return PJ_TRUE;
}

/* Drop `names` from a capability header's value list (Allow, Accept or Supported); with
 * `keep`, drop everything else instead. */
void cr_strip_capability(int htype, const char *const *names, unsigned n, bool keep = false) {
    pjsip_generic_array_hdr *h = (pjsip_generic_array_hdr *)
        pjsip_endpt_get_capability(pjsua_get_pjsip_endpt(), htype, NULL);
    if (h == NULL) return;
    unsigned out = 0;
    for (unsigned i = 0; i < h->count; ++i) {
        bool drop = false;
        for (unsigned j = 0; j < n; ++j) {
            pj_str_t s = pj_str((char *)names[j]);
            if (pj_stricmp(&h->values[i], &s) == 0) drop = true;
        }
        if (keep) drop = !drop;
        if (!drop) h->values[out++] = h->values[i];
    }
    h->count = out;
}

}  // namespace

int crGuardInstall() {
    if (cr_installed) return 0;
    std::memset(&cr_mod, 0, sizeof(cr_mod));
    cr_mod.name = pj_str((char *)"mod-callrouter-guard");
    cr_mod.id = -1;
    cr_mod.priority = PJSIP_MOD_PRIORITY_TSX_LAYER - 1;
    cr_mod.on_rx_request = &cr_on_rx_request;
    cr_mod.on_rx_response = &cr_on_rx_response;
    pj_status_t st = pjsip_endpt_register_module(pjsua_get_pjsip_endpt(), &cr_mod);
    if (st != PJ_SUCCESS) return (int)st;
    std::memset(&cr_fallback_mod, 0, sizeof(cr_fallback_mod));
    cr_fallback_mod.name = pj_str((char *)"mod-callrouter-fallback");
    cr_fallback_mod.id = -1;
    cr_fallback_mod.priority = PJSIP_MOD_PRIORITY_APPLICATION + 32;  /* after everyone */
    cr_fallback_mod.on_rx_request = &cr_on_rx_unhandled;
    st = pjsip_endpt_register_module(pjsua_get_pjsip_endpt(), &cr_fallback_mod);
    if (st != PJ_SUCCESS) return (int)st;
    pjsip_tpmgr_set_drop_data_cb(pjsip_endpt_get_tpmgr(pjsua_get_pjsip_endpt()), &cr_on_dropped);
    pj_str_t realm = pj_str((char *)CR_REALM);
    pj_pool_t *auth_pool = pjsua_pool_create("crguard-auth", 256, 256);
    cr_auth_ready = auth_pool != NULL &&
        pjsip_auth_srv_init(auth_pool, &cr_auth_srv, &realm, &cr_auth_lookup,
                            PJSIP_AUTH_SRV_IS_PROXY) == PJ_SUCCESS;
    cr_strip_capability(PJSIP_H_ALLOW, CR_REFUSED, sizeof(CR_REFUSED) / sizeof(CR_REFUSED[0]));
    /* No call takeover, no REFER, no ICE: only 100rel and timer stay. */
    static const char *const unsupported[] = {"replaces", "norefersub", "trickle-ice"};
    cr_strip_capability(PJSIP_H_SUPPORTED, unsupported, 3);
    /* Bodies the router acts on: SDP (INVITE, re-INVITE, UPDATE) and DTMF relay (INFO). */
    static const char *const accepted[] = {"application/sdp", "application/dtmf-relay"};
    cr_strip_capability(PJSIP_H_ACCEPT, accepted, 2, true);
    static const pj_str_t dtmf_relay = {(char *)"application/dtmf-relay", 22};
    if (!pjsip_endpt_has_capability(pjsua_get_pjsip_endpt(), PJSIP_H_ACCEPT, NULL, &dtmf_relay))
        pjsip_endpt_add_capability(pjsua_get_pjsip_endpt(), &cr_mod, PJSIP_H_ACCEPT, NULL, 1,
                                   &dtmf_relay);
    cr_installed = true;
    return 0;
}

void crGuardClearNetworks() { cr_nets.clear(); }

int crGuardAllowNetwork(const std::string &addr, unsigned prefix) {
    CrNet n;
    std::memset(&n, 0, sizeof(n));
    pj_str_t s = pj_str((char *)addr.c_str());
    if (pj_inet_pton(pj_AF_INET(), &s, n.addr) == PJ_SUCCESS) {
        n.af = pj_AF_INET();
        if (prefix > 32) return PJ_EINVAL;
    } else if (pj_inet_pton(pj_AF_INET6(), &s, n.addr) == PJ_SUCCESS) {
        n.af = pj_AF_INET6();
        if (prefix > 128) return PJ_EINVAL;
    } else {
        return PJ_EINVAL;
    }
    n.prefix = prefix;
    cr_nets.push_back(n);
    return 0;
}

void crGuardSetSourceRejectCode(int code) { cr_reject_code = code; }
void crGuardSetSlotReserve(unsigned reserve) { cr_slot_reserve = reserve; }
void crGuardSetMaxMessageBytes(unsigned bytes) { cr_max_message = bytes; }
unsigned long crGuardTooLarge() { return cr_too_large.load(); }
unsigned long crGuardKeepalivePongs() { return cr_pongs.load(); }
unsigned long crGuardOptionsAnswered() { return cr_options.load(); }
void crGuardSetDraining(bool draining, unsigned retry_after) {
    cr_drain_retry_after = retry_after;
    cr_draining = draining;
}
unsigned long crGuardOptionsDraining() { return cr_options_draining.load(); }
void crGuardSetFloodControl(unsigned limit_per_second, unsigned ban_seconds) {
    cr_flood_limit = limit_per_second;
    cr_flood_ban_ms = (pj_uint32_t)ban_seconds * 1000;
    cr_flood.clear();
}
unsigned long crGuardFloodDropped() { return cr_flood_dropped.load(); }
unsigned long crGuardFloodBans() { return cr_flood_bans.load(); }
unsigned crGuardFloodTracked() { return (unsigned)cr_flood.size(); }
std::string crGuardTakeNewBans() {
    std::string out;
    for (const std::string &s : cr_new_bans) out += (out.empty() ? "" : " ") + s;
    cr_new_bans.clear();
    return out;
}
unsigned long crGuardDroppedSources() { return cr_dropped.load(); }
unsigned long crGuardRefusedMethods() { return cr_refused.load(); }
unsigned long crGuardRefusedReplaces() { return cr_replaces.load(); }
unsigned long crGuardEngineFull() { return cr_full.load(); }
unsigned long crGuardMalformed() { return cr_malformed_count.load(); }
unsigned long crGuardUnparsable() { return cr_unparsable.load(); }

void crGuardTrunksBegin() {
    std::lock_guard<std::mutex> hold(cr_staging_mu);
    cr_staging = CrTrunks();
}

int crGuardTrunksAddNetwork(const std::string &addr, unsigned prefix, const std::string &trunk) {
    CrTrunkNet n;
    if (!cr_parse_net(addr, prefix, &n.af, n.addr)) return PJ_EINVAL;
    n.prefix = prefix;
    n.trunk = trunk;
    std::lock_guard<std::mutex> hold(cr_staging_mu);
    cr_staging.nets.push_back(n);
    return 0;
}

void crGuardTrunksAddAuth(const std::string &trunk, const std::string &username,
                          const std::string &password) {
    std::lock_guard<std::mutex> hold(cr_staging_mu);
    cr_staging.auth[trunk] = std::make_pair(username, password);
}

void crGuardTrunksAddRegistrationUser(const std::string &user, const std::string &trunk) {
    std::lock_guard<std::mutex> hold(cr_staging_mu);
    cr_staging.users[user] = trunk;
}

void crGuardTrunksPublish() {
    std::shared_ptr<CrTrunks> next;
    {
        std::lock_guard<std::mutex> hold(cr_staging_mu);
        next = std::make_shared<CrTrunks>(cr_staging);
    }
    std::stable_sort(next->nets.begin(), next->nets.end(),
                     [](const CrTrunkNet &a, const CrTrunkNet &b) { return a.prefix > b.prefix; });
    std::shared_ptr<const CrTrunks> old;
    {
        std::lock_guard<std::mutex> hold(cr_trunks_mu);
        old = cr_trunks;
        cr_trunks = next;
    }
    /* `old` is freed here, outside the lock, or by the last reader still holding it. */
}

std::string crGuardTrunkFor(const std::string &source, const std::string &user) {
    std::shared_ptr<const CrTrunks> trunks = cr_trunks_now();
    pj_sockaddr addr;
    pj_str_t text = pj_str((char *)source.c_str());
    if (pj_sockaddr_parse(pj_AF_UNSPEC(), 0, &text, &addr) == PJ_SUCCESS) {
        const std::string *trunk = cr_trunk_of(*trunks, &addr);
        if (trunk != NULL) return *trunk;
    }
    auto found = trunks->users.find(user);
    return found == trunks->users.end() ? "" : found->second;
}

int crGuardIsRegistrationUser(const std::string &user) {
    std::shared_ptr<const CrTrunks> trunks = cr_trunks_now();
    return trunks->users.count(user) ? 1 : 0;
}

unsigned long crGuardAuthChallenged() { return cr_auth_challenged.load(); }
unsigned long crGuardAuthFailed() { return cr_auth_failed.load(); }
unsigned long crGuardAuthOk() { return cr_auth_ok.load(); }
unsigned long crGuardTrunkAllowed() { return cr_trunk_allowed.load(); }
