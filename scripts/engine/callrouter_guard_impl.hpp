/* Implementation of callrouter_guard.hpp; see that file for how it works. */
#include "callrouter_guard.hpp"
#include <pjsip.h>
#include <pjsip_ua.h>
#include <pjsua-lib/pjsua.h>
#include <atomic>
#include <cstring>
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
    if (cr_is_refused_method(m)) {
        cr_refused++;
        cr_respond(rdata, PJSIP_SC_METHOD_NOT_ALLOWED, "Allow", CR_ALLOW);
        return PJ_TRUE;
    }
    if (m->id != PJSIP_INVITE_METHOD) return PJ_FALSE;
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
