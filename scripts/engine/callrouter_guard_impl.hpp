/* Implementation of callrouter_guard.hpp; see that file for how it works. */
#include "callrouter_guard.hpp"
#include <pjsip.h>
#include <pjsip_ua.h>
#include <pjsua-lib/pjsua.h>
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstddef>
#include <cstring>
#include <string>
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
std::atomic<unsigned long> cr_dropped(0), cr_refused(0), cr_replaces(0), cr_full(0);
std::atomic<unsigned long> cr_malformed_count(0), cr_unparsable(0);
pjsip_module cr_mod, cr_fallback_mod;
bool cr_installed = false;

const char *const CR_REFUSED[] = {"REFER", "MESSAGE", "SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER"};
const char CR_ALLOW[] = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, PRACK";

bool cr_prefix_match(const unsigned char *a, const unsigned char *b, unsigned bits) {
    unsigned bytes = bits / 8, rest = bits % 8;
    if (std::memcmp(a, b, bytes) != 0) return false;
    if (rest == 0) return true;
    unsigned char mask = (unsigned char)(0xFF << (8 - rest));
    return (a[bytes] & mask) == (b[bytes] & mask);
}

bool cr_source_allowed(const pj_sockaddr *src) {
    int af = src->addr.sa_family;
    const unsigned char *raw = (const unsigned char *)pj_sockaddr_get_addr(src);
    unsigned char mapped[4];
    if (af == pj_AF_INET6()) {
        /* ::ffff:a.b.c.d arrives on dual-stack sockets: match it as IPv4. */
        static const unsigned char v4prefix[12] = {0,0,0,0,0,0,0,0,0,0,0xff,0xff};
        if (std::memcmp(raw, v4prefix, 12) == 0) {
            std::memcpy(mapped, raw + 12, 4);
            raw = mapped;
            af = pj_AF_INET();
        }
    }
    for (const CrNet &n : cr_nets) {
        if (n.af == af && cr_prefix_match(raw, n.addr, n.prefix)) return true;
    }
    return false;
}

bool cr_in_live_dialog(pjsip_rx_data *rdata) {
    /* RFC 3261 s12.2: an in-dialog request carries the To tag we gave. */
    if (rdata->msg_info.to == NULL || rdata->msg_info.to->tag.slen == 0) return false;
    pjsip_dialog *dlg = pjsip_ua_find_dialog(&rdata->msg_info.cid->id,
                                             &rdata->msg_info.to->tag,
                                             &rdata->msg_info.from->tag, PJ_FALSE);
    return dlg != NULL;
}

void cr_respond(pjsip_rx_data *rdata, int code, const char *hname, const char *hvalue) {
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
    pjsip_endpt_respond_stateless(pjsua_get_pjsip_endpt(), rdata, code, NULL,
                                  hname ? &hdrs : NULL, NULL);
}

void cr_respond_reason(pjsip_rx_data *rdata, int code, const char *reason) {
    pj_str_t text = pj_str((char *)reason);
    pjsip_endpt_respond_stateless(pjsua_get_pjsip_endpt(), rdata, code, &text, NULL, NULL);
}

/* ---- checks pjsip's liberal parser lets through (RFC 4475 s3.1.2) ---------------- */

/* The raw header lines of the message, unfolded (RFC 3261 s7.3.1), as (name, value). */
std::vector<std::pair<std::string, std::string>> cr_raw_headers(const char *buf, pj_size_t len) {
    std::vector<std::pair<std::string, std::string>> out;
    std::string text(buf, len);
    std::size_t end = text.find("\r\n\r\n");
    if (end == std::string::npos) end = text.size();
    std::size_t pos = text.find("\r\n");  /* skip the request line */
    std::string line;
    auto flush = [&]() {
        std::size_t colon = line.find(':');
        if (colon != std::string::npos) {
            std::string name = line.substr(0, colon);
            while (!name.empty() && (name.back() == ' ' || name.back() == '\t')) name.pop_back();
            for (char &c : name) c = (char)std::tolower((unsigned char)c);
            out.emplace_back(name, line.substr(colon + 1));
        }
        line.clear();
    };
    while (pos != std::string::npos && pos < end) {
        pos += 2;
        std::size_t next = text.find("\r\n", pos);
        std::string raw = text.substr(pos, (next == std::string::npos ? end : std::min(next, end)) - pos);
        if (!raw.empty() && (raw[0] == ' ' || raw[0] == '\t')) line += " " + raw;
        else { flush(); line = raw; }
        pos = next;
    }
    flush();
    return out;
}

bool cr_is_token_char(char c) {
    /* Octets >= 0x80 pass: unquoted UTF-8 names are common enough to tolerate. */
    return ((unsigned char)c & 0x80) || std::isalnum((unsigned char)c) ||
           std::strchr("-.!%*_+`'~ \t", c) != NULL;
}

/* RFC 3261 s20.10 / s25.1 name-addr: an unquoted display name is tokens only, and
 * nothing but the addr-spec sits between '<' and '>'. */
const char *cr_bad_name_addr(const std::string &value) {
    std::size_t lt = value.find('<');
    if (lt == std::string::npos) return NULL;
    std::size_t gt = value.find('>', lt);
    if (gt == std::string::npos) return "unterminated <addr-spec>";
    if (std::isspace((unsigned char)value[lt + 1]) || std::isspace((unsigned char)value[gt - 1]))
        return "whitespace inside <addr-spec>";
    std::string display = value.substr(0, lt);
    if (display.find('"') != std::string::npos) return NULL;
    for (char c : display)
        if (!cr_is_token_char(c)) return "unquoted display name is not a token";
    return NULL;
}

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

std::string cr_header_lines(const std::vector<std::pair<std::string, std::string>> &hs,
                            const char *full, const char *compact, bool all) {
    std::string out;
    for (const auto &h : hs) {
        if (h.first == full || h.first == compact) {
            std::string value = h.second;
            std::size_t b = value.find_first_not_of(" \t");
            value = b == std::string::npos ? "" : value.substr(b);
            out += std::string(full == std::string("call-id") ? "Call-ID" :
                               full == std::string("cseq") ? "CSeq" :
                               full == std::string("via") ? "Via" :
                               full == std::string("from") ? "From" : "To") + ": " + value + "\r\n";
            if (!all) break;
        }
    }
    return out;
}

std::string cr_unparsable_response(const char *data, pj_size_t len) {
    std::string text(data, len);
    std::size_t eol = text.find("\r\n");
    if (eol == std::string::npos) return "";
    std::string first = text.substr(0, eol);
    std::size_t sp1 = first.find(' '), sp2 = first.rfind(' ');
    if (sp1 == std::string::npos || sp2 <= sp1 || first.compare(sp2 + 1, 4, "SIP/") != 0)
        return "";  /* not a request line we can read */
    if (first.compare(0, sp1, "ACK") == 0 || first.compare(0, 4, "SIP/") == 0) return "";
    std::string method = first.substr(0, sp1);
    bool refused = false;
    for (const char *name : CR_REFUSED) refused = refused || method == name;
    std::string uri = first.substr(sp1 + 1, sp2 - sp1 - 1);
    std::string scheme = uri.substr(0, uri.find(':'));
    for (char &c : scheme) c = (char)std::tolower((unsigned char)c);
    bool known = scheme == "sip" || scheme == "sips" || scheme == "tel";
    auto hs = cr_raw_headers(data, len);
    std::string via = cr_header_lines(hs, "via", "v", true);
    std::string from = cr_header_lines(hs, "from", "f", false);
    std::string to = cr_header_lines(hs, "to", "t", false);
    std::string cid = cr_header_lines(hs, "call-id", "i", false);
    std::string cseq = cr_header_lines(hs, "cseq", "cseq", false);
    if (via.empty() || from.empty() || to.empty() || cid.empty() || cseq.empty()) return "";
    if (to.find("tag=") == std::string::npos) to.insert(to.size() - 2, ";tag=cr-unparsable");
    /* A method we refuse anyway gets its 405 whatever else is wrong with it. */
    std::string status = refused ? "SIP/2.0 405 Method Not Allowed\r\nAllow: " +
                                       std::string(CR_ALLOW) + "\r\n"
                         : known ? "SIP/2.0 400 Bad Request\r\n"
                                 : "SIP/2.0 416 Unsupported URI Scheme\r\n";
    return status + via + from + to + cid + cseq + "Content-Length: 0\r\n\r\n";
}

void cr_on_dropped(pjsip_tp_dropped_data *dd) {
    if (dd->status != PJSIP_EINVALIDMSG || dd->tp == NULL) return;
    std::string response = cr_unparsable_response((const char *)dd->data, dd->len);
    if (response.empty()) return;
    pj_sockaddr dst;
    int dst_len;
    if (dd->tp->flag & PJSIP_TRANSPORT_RELIABLE) {
        dst = dd->tp->key.rem_addr;
        dst_len = dd->tp->addr_len;
    } else {
        /* UDP hands pjsip one datagram per rx_data, starting at pkt_info.packet: the
         * source address sits in the same rx_data. */
        pjsip_rx_data *rdata = (pjsip_rx_data *)((char *)dd->data -
                                                  offsetof(pjsip_rx_data, pkt_info.packet));
        if (rdata->tp_info.transport != dd->tp) return;
        dst = rdata->pkt_info.src_addr;
        dst_len = rdata->pkt_info.src_addr_len;
    }
    if (!cr_source_allowed(&dst)) return;  /* the source policy applies here too */
    pjsip_tpselector sel;
    pj_bzero(&sel, sizeof(sel));
    sel.type = PJSIP_TPSELECTOR_TRANSPORT;
    sel.u.transport = dd->tp;
    cr_unparsable++;
    pjsip_tpmgr_send_raw(pjsip_endpt_get_tpmgr(pjsua_get_pjsip_endpt()),
                         (pjsip_transport_type_e)dd->tp->key.type, &sel, NULL,
                         response.data(), response.size(), &dst, dst_len, NULL, NULL);
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

bool cr_is_refused_method(const pjsip_method *m) {
    for (const char *name : CR_REFUSED) {
        pj_str_t s = pj_str((char *)name);
        if (pj_stricmp(&m->name, &s) == 0) return true;
    }
    return false;
}

pj_bool_t cr_on_rx_request(pjsip_rx_data *rdata) {
    const pjsip_method *m = &rdata->msg_info.msg->line.req.method;
    if (!cr_source_allowed(&rdata->pkt_info.src_addr) && !cr_in_live_dialog(rdata)) {
        cr_dropped++;
        if (cr_reject_code) cr_respond(rdata, cr_reject_code, NULL, NULL);
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
    if (m->id != PJSIP_INVITE_METHOD) return PJ_FALSE;
    cr_repair_contact(rdata);
    pj_str_t replaces = pj_str((char *)"Replaces");
    if (pjsip_msg_find_hdr_by_name(rdata->msg_info.msg, &replaces, NULL)) {
        cr_replaces++;
        cr_respond(rdata, PJSIP_SC_FORBIDDEN, NULL, NULL);
        return PJ_TRUE;
    }
    bool initial = rdata->msg_info.to->tag.slen == 0;
    if (initial && cr_slot_reserve &&
        pjsua_call_get_count() + cr_slot_reserve >= pjsua_call_get_max_count()) {
        cr_full++;
        cr_respond(rdata, PJSIP_SC_SERVICE_UNAVAILABLE, "Retry-After", "5");
        return PJ_TRUE;
    }
    return PJ_FALSE;
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

/* Drop `names` from a capability header's value list (Allow or Supported). */
void cr_strip_capability(int htype, const char *const *names, unsigned n) {
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
    cr_strip_capability(PJSIP_H_ALLOW, CR_REFUSED, sizeof(CR_REFUSED) / sizeof(CR_REFUSED[0]));
    static const char *const unsupported[] = {"replaces", "norefersub"};
    cr_strip_capability(PJSIP_H_SUPPORTED, unsupported, 2);
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
unsigned long crGuardDroppedSources() { return cr_dropped.load(); }
unsigned long crGuardRefusedMethods() { return cr_refused.load(); }
unsigned long crGuardRefusedReplaces() { return cr_replaces.load(); }
unsigned long crGuardEngineFull() { return cr_full.load(); }
unsigned long crGuardMalformed() { return cr_malformed_count.load(); }
unsigned long crGuardUnparsable() { return cr_unparsable.load(); }
