/* Implementation of callrouter_relay.hpp; see that file for how it works. */
#include "callrouter_relay.hpp"
#include <pjmedia.h>
#include <pjsua-lib/pjsua.h>
#include <pjsua-lib/pjsua_internal.h>

/* The relay needs pjmedia transports with group locks (their lifetime across threads)
 * and pjlib of 2.14 or later. The 2.12.1 fallback engine, built on explicit request
 * only (docs/engine.md), gets no relay: every bridge stays on the audio switchboard. */
#if PJ_VERSION_NUM < ((2 << 24) | (14 << 16))
int crRelayInstall(int, int) { return 0; }
int crRelayBridge(int, int) { return 0; }
int crRelayDtmf(int, const std::string &) { return 0; }
std::string crRelayCodecOf(int) { return std::string(); }
unsigned crRelayPairs() { return 0; }
unsigned crRelayThreadPairs() { return 0; }
unsigned long crRelayThreadPackets() { return 0; }
unsigned long crRelayRtp() { return 0; }
unsigned long crRelayRtcp() { return 0; }
unsigned long crRelayDropped() { return 0; }
unsigned long crRelayDtmfEvents() { return 0; }
#else
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>
#include <sys/epoll.h>
#include <sys/socket.h>

namespace {

/* ---- RTP/RTCP header fields (RFC 3550 s5.1, s6.4) -------------------------------- */
inline pj_uint16_t crr_rd16(const pj_uint8_t *p) { return (pj_uint16_t)((p[0] << 8) | p[1]); }
inline pj_uint32_t crr_rd32(const pj_uint8_t *p) {
    return ((pj_uint32_t)p[0] << 24) | ((pj_uint32_t)p[1] << 16) | ((pj_uint32_t)p[2] << 8) | p[3];
}
inline void crr_wr16(pj_uint8_t *p, pj_uint16_t v) { p[0] = (pj_uint8_t)(v >> 8); p[1] = (pj_uint8_t)v; }
inline void crr_wr32(pj_uint8_t *p, pj_uint32_t v) {
    p[0] = (pj_uint8_t)(v >> 24); p[1] = (pj_uint8_t)(v >> 16); p[2] = (pj_uint8_t)(v >> 8); p[3] = (pj_uint8_t)v;
}
const unsigned CR_RTP_HDR = 12;
const unsigned CR_RTP_MAX = 1500;

/* What one leg sends towards its far end: one RTP stream for the leg's life. */
struct CrOut {
    pj_uint32_t ssrc = 0;       /* the SSRC the far end sees */
    pj_uint32_t in_ssrc = 0;    /* the current source's SSRC */
    pj_uint32_t last_ts = 0;
    pj_uint32_t ts_off = 0;     /* added to the source's timestamps */
    pj_uint16_t last_seq = 0;
    pj_uint16_t seq_off = 0;    /* added to the source's sequence numbers */
    bool have = false;          /* a packet was sent: ssrc/last_* are set */
    pj_timestamp last_at{};     /* when last_ts was sent */
    const void *source = nullptr;  /* the leg's own stream (its adapter) or the peer */
};

/* RFC 4733 events sent towards a relayed leg for SIP INFO DTMF (crRelayDtmf): one packet
 * per ptime from a pjsua timer on the SIP thread, whether or not audio is being relayed
 * to that leg; relayed audio towards it is held back while an event lasts. */
struct CrDtmf {
    int event = -1;             /* the event being sent, -1 = none (first: read per packet) */
    std::deque<int> queued;     /* event codes waiting */
    pj_uint32_t start_ts = 0;
    unsigned duration = 0;      /* samples so far */
    unsigned ends = 0;          /* end packets sent (three, RFC 4733 s2.5.1.4) */
    bool ticking = false;       /* a timer is scheduled */
};

struct CrRelayTp {
    pjmedia_transport base;     /* first: the adapter is a pjmedia_transport */
    pj_pool_t *pool;
    pjmedia_transport *slave;
    bool del_base;
    /* The stream attached to us, and its callbacks. */
    void *stream_user_data;
    void (*stream_rtp_cb)(void *, void *, pj_ssize_t);
    void (*stream_rtp_cb2)(pjmedia_tp_cb_param *);
    void (*stream_rtcp_cb)(void *, void *, pj_ssize_t);
    /* Guarded by crr_mu (and, where a relay thread has the leg, by its lock too). */
    pjmedia_stream *paused;     /* the stream we paused for the relay */
    /* Handed to a relay thread (crr_mu and the shard's lock both held to change it; the
     * thread reads it under the shard's lock): the pjmedia keys of the UDP sockets, out
     * of pjmedia's epoll set, and where RTCP towards the far end goes. */
    pj_ioqueue_key_t *rtp_key, *rtcp_key;
    unsigned rtp_slot, rtcp_slot;
    pj_sockaddr rem_rtcp;
    /* What a relay thread reads for every packet, on two cache lines from here: a
     * packet's receiving leg needs the first, its sending leg both (at 1,000 calls,
     * the fields spread over the struct cost a cache miss each). */
    alignas(64) CrRelayTp *peer;  /* relayed to/from this leg; null = the stream's path */
    struct CrShard *shard;      /* the relay thread that has the sockets, or null */
    int rtp_fd, rtcp_fd;
    pj_int16_t pt_in, pt_out;   /* the codec's payload type from / to the far end */
    pj_int16_t event_in, event_out;  /* telephone-event payload types, -1 = not negotiated */
    unsigned clock_rate;        /* RTP clock */
    unsigned samples_per_packet;
    int addr_len;
    bool may_receive;           /* the far end sends to us (our SDP allows it) */
    bool may_send;              /* we send to the far end */
    CrOut out;
    pj_sockaddr rem_rtp;        /* where RTP towards the far end goes */
    CrDtmf dtmf;                /* its event, first, is read per packet */
};
static_assert(offsetof(CrRelayTp, out) - offsetof(CrRelayTp, peer) < 64
              && offsetof(CrRelayTp, dtmf) + sizeof(int) - offsetof(CrRelayTp, peer) <= 128,
              "a relay thread's per-packet fields fit the two cache lines it fetches");

/* Packet counters: the callback path's atomics, a relay thread's under its lock. */
struct CrCounts {
    unsigned long rtp = 0, rtcp = 0, dropped = 0;
};

/* A relay thread and the sockets it reads. Epoll data is a slot index and the slot's
 * generation, so an event still in a thread's batch for a socket taken back since is
 * recognised and skipped. */
struct CrSlot {
    CrRelayTp *tp = nullptr;
    bool rtcp = false;
    pj_uint32_t gen = 0;
};
struct CrShard {
    std::mutex mu;
    int epfd = -1;
    std::vector<CrSlot> slots;
    std::vector<unsigned> free_slots;
    CrCounts counts;
    unsigned legs = 0;          /* legs it has: changed under crr_mu and its lock */
};

std::mutex crr_mu;
std::vector<CrShard *> crr_shards;  /* fixed once crRelayInstall has run */
bool crr_enabled = true;
bool crr_installed = false;
pjmedia_transport *(*crr_chained)(pjsua_call_id, unsigned, pjmedia_transport *, unsigned) = nullptr;
std::atomic<unsigned> crr_pairs(0);
std::atomic<unsigned long> crr_rtp(0), crr_rtcp(0), crr_dropped(0), crr_dtmf_events(0);
std::unique_lock<std::mutex> crr_lock_thread(CrRelayTp *tp);

/* ---- the rewrite: one continuous stream per leg ---------------------------------- */

/* Rewrites the RTP packet `p` (checked: version 2, at least a fixed header) from
 * `source` for sending on the leg whose state is `o`. */
void crr_rewrite(CrOut &o, const void *source, pj_uint8_t *p, unsigned clock_rate,
                unsigned samples_per_packet) {
    pj_uint16_t seq = crr_rd16(p + 2);
    pj_uint32_t ts = crr_rd32(p + 4), ssrc = crr_rd32(p + 8);
    pj_timestamp now;
    pj_get_timestamp(&now);
    if (!o.have) {
        o.have = true;
        o.ssrc = ssrc;
        o.source = source;
        o.in_ssrc = ssrc;
        o.last_seq = (pj_uint16_t)(seq - 1);
        o.last_ts = ts;
        o.last_at = now;
    } else if (source != o.source || ssrc != o.in_ssrc) {
        /* A new source: go on from the last packet sent, one packet on at least, and
         * as far on as the wall clock went (a gap stays a gap for the receiver). */
        pj_uint64_t gap = (pj_uint64_t)pj_elapsed_msec(&o.last_at, &now) * clock_rate / 1000;
        if (gap < samples_per_packet)
            gap = samples_per_packet;
        o.seq_off = (pj_uint16_t)(o.last_seq + 1 - seq);
        o.ts_off = (pj_uint32_t)(o.last_ts + (pj_uint32_t)gap - ts);
        o.source = source;
        o.in_ssrc = ssrc;
        p[1] |= 0x80;  /* marker: a new talkspurt (RFC 3551 s4.1) */
    }
    seq = (pj_uint16_t)(seq + o.seq_off);
    ts += o.ts_off;
    crr_wr16(p + 2, seq);
    crr_wr32(p + 4, ts);
    crr_wr32(p + 8, o.ssrc);
    if ((pj_int16_t)(seq - o.last_seq) > 0)
        o.last_seq = seq;
    if ((pj_int32_t)(ts - o.last_ts) >= 0) {
        o.last_ts = ts;
        o.last_at = now;
    }
}

/* RTCP from a source on its way out of the leg `o`: the sender's SSRC and the SR's RTP
 * timestamp as the receiver knows them; report blocks about the stream the source
 * receives (`rev`: what the source's own leg sends it) name that stream's original
 * SSRC and sequence numbers. */
void crr_rewrite_rtcp(const CrOut &o, const CrOut *rev, pj_uint8_t *p, pj_size_t size) {
    pj_size_t at = 0;
    while (at + 8 <= size) {
        pj_uint8_t *h = p + at;
        if ((h[0] >> 6) != 2)
            return;
        pj_size_t len = ((pj_size_t)crr_rd16(h + 2) + 1) * 4;
        if (at + len > size)
            return;
        unsigned count = h[0] & 0x1f, type = h[1];
        pj_size_t blocks = 0;
        if (o.have && (type == 200 || type == 201 || type == 202 || type == 203))
            crr_wr32(h + 4, o.ssrc);  /* SR/RR sender, first SDES chunk, first BYE source */
        if (type == 200 && len >= 28) {
            crr_wr32(h + 16, crr_rd32(h + 16) + o.ts_off);
            blocks = 28;
        } else if (type == 201) {
            blocks = 8;
        }
        for (unsigned i = 0; blocks && i < count && blocks + 24 * (i + 1) <= len; ++i) {
            pj_uint8_t *rb = h + blocks + 24 * i;
            if (rev && rev->have && crr_rd32(rb) == rev->ssrc) {
                crr_wr32(rb, rev->in_ssrc);
                pj_uint32_t ext = crr_rd32(rb + 8);
                crr_wr32(rb + 8, (ext & 0xffff0000u) | (pj_uint16_t)((pj_uint16_t)ext - rev->seq_off));
            }
        }
        at += len;
    }
}

int crr_event_code(char digit) {
    if (digit >= '0' && digit <= '9')
        return digit - '0';
    switch (digit) {
    case '*': return 10;
    case '#': return 11;
    case 'A': case 'a': return 12;
    case 'B': case 'b': return 13;
    case 'C': case 'c': return 14;
    case 'D': case 'd': return 15;
    default: return -1;
    }
}

/* Writes the next packet of the leg's DTMF event into `p` (16 bytes); returns false when
 * no event is due. crr_mu held. */
bool crr_dtmf_packet(CrRelayTp *tp, pj_uint8_t *p) {
    CrDtmf &d = tp->dtmf;
    CrOut &o = tp->out;
    bool first = false;
    if (d.event < 0) {
        if (d.queued.empty() || tp->event_out < 0)
            return false;
        d.event = d.queued.front();
        d.queued.pop_front();
        d.duration = 0;
        d.ends = 0;
        first = true;
        /* The event starts where the leg's stream is now (RFC 4733 s2.5.1.1). */
        pj_timestamp now;
        pj_get_timestamp(&now);
        pj_uint64_t gap = o.have ? (pj_uint64_t)pj_elapsed_msec(&o.last_at, &now)
                                   * tp->clock_rate / 1000 : 0;
        if (gap < tp->samples_per_packet)
            gap = tp->samples_per_packet;
        if (!o.have) {
            o.have = true;
            o.ssrc = (pj_uint32_t)pj_rand();
            o.last_seq = (pj_uint16_t)pj_rand();
            o.last_ts = (pj_uint32_t)pj_rand();
        }
        d.start_ts = o.last_ts + (pj_uint32_t)gap;
        o.source = &tp->dtmf;  /* the next relayed packet starts anew after the events */
    }
    unsigned length = tp->clock_rate / 5;  /* 200 ms, pjmedia's PJMEDIA_DTMF_DURATION */
    bool end = d.duration >= length;
    if (!end)
        d.duration += tp->samples_per_packet;
    p[0] = 0x80;
    p[1] = (pj_uint8_t)((first ? 0x80 : 0) | tp->event_out);  /* marker on the first */
    crr_wr16(p + 2, ++o.last_seq);
    crr_wr32(p + 4, d.start_ts);
    crr_wr32(p + 8, o.ssrc);
    p[12] = (pj_uint8_t)d.event;
    p[13] = (pj_uint8_t)((end ? 0x80 : 0) | 10);  /* E bit, volume -10 dBm0 */
    crr_wr16(p + 14, (pj_uint16_t)d.duration);
    pj_get_timestamp(&o.last_at);
    o.last_ts = d.start_ts;
    if (end && ++d.ends == 3) {  /* over: audio goes on after the event's length */
        o.last_ts = d.start_ts + d.duration;
        d.event = -1;
        crr_dtmf_events++;
    }
    return true;
}

/* The leg's DTMF clock: pjsua's timer heap (the SIP thread) every ptime while events are
 * queued. The leg is found again by its call id; a call that ended, or whose transport
 * is another one now, stops it. */
struct CrTick {
    int call_id;
    CrRelayTp *tp;
};
void crr_dtmf_schedule(CrRelayTp *tp, int call_id);

void crr_dtmf_tick(void *arg) {
    CrTick *tick = (CrTick *)arg;
    int call_id = tick->call_id;
    CrRelayTp *tp = tick->tp;
    delete tick;
    PJSUA_LOCK();
    bool alive = false;
    if (call_id >= 0 && call_id < (int)pjsua_var.ua_cfg.max_calls) {
        pjsua_call *call = &pjsua_var.calls[call_id];
        for (unsigned i = 0; call->inv && i < call->med_cnt; ++i)
            alive = alive || call->media[i].tp == &tp->base;
    }
    if (alive) {
        std::lock_guard<std::mutex> lock(crr_mu);
        std::unique_lock<std::mutex> thread_lock = crr_lock_thread(tp);
        tp->dtmf.ticking = false;
        pj_uint8_t p[16];
        if (tp->peer && tp->may_send && crr_dtmf_packet(tp, p)) {
            if (pjmedia_transport_send_rtp(tp->slave, p, sizeof(p)) == PJ_SUCCESS)
                crr_rtp++;
            crr_dtmf_schedule(tp, call_id);
        } else if (!tp->peer || !tp->may_send) {
            /* No longer relayed, or on hold: the rest of these digits is dropped, and
             * relayed audio is never held back for them. */
            tp->dtmf.event = -1;
            tp->dtmf.queued.clear();
        }
    }
    PJSUA_UNLOCK();
}

void crr_dtmf_schedule(CrRelayTp *tp, int call_id) {  /* crr_mu held */
    if (tp->dtmf.ticking || (tp->dtmf.event < 0 && tp->dtmf.queued.empty()))
        return;
    unsigned ms = tp->clock_rate ? tp->samples_per_packet * 1000 / tp->clock_rate : 20;
    CrTick *tick = new CrTick{call_id, tp};
    if (pjsua_schedule_timer2(&crr_dtmf_tick, tick, ms ? ms : 20) == PJ_SUCCESS)
        tp->dtmf.ticking = true;
    else
        delete tick;
}

/* ---- relay threads ----------------------------------------------------------------- */

/* Takes `tp` back from its relay thread: its sockets leave the thread's epoll set, and
 * their pjmedia keys go into `resume`, to go back into pjmedia's set once the caller has
 * let go of crr_mu (pj_ioqueue_suspend_key takes the key's lock). crr_mu held. */
void crr_unhand(CrRelayTp *tp, std::vector<pj_ioqueue_key_t *> &resume) {
    CrShard *sh = tp->shard;
    if (!sh)
        return;
    std::lock_guard<std::mutex> lock(sh->mu);
    for (unsigned idx : {tp->rtp_slot, tp->rtcp_slot}) {
        CrSlot &slot = sh->slots[idx];
        int fd = slot.rtcp ? tp->rtcp_fd : tp->rtp_fd;
        epoll_event ev{};
        epoll_ctl(sh->epfd, EPOLL_CTL_DEL, fd, &ev);
        slot.tp = nullptr;
        slot.gen++;
        sh->free_slots.push_back(idx);
    }
    sh->legs--;
    tp->shard = nullptr;
    resume.push_back(tp->rtp_key);
    resume.push_back(tp->rtcp_key);
}

unsigned crr_slot(CrShard *sh, CrRelayTp *tp, bool rtcp) {  /* the shard's lock held */
    unsigned idx;
    if (!sh->free_slots.empty()) {
        idx = sh->free_slots.back();
        sh->free_slots.pop_back();
    } else {
        idx = (unsigned)sh->slots.size();
        sh->slots.emplace_back();
    }
    sh->slots[idx].tp = tp;
    sh->slots[idx].rtcp = rtcp;
    return idx;
}

/* Hands `tp` (its sockets already suspended in pjmedia) to the relay thread `sh`, or
 * updates where its packets go when it is there already. crr_mu held. */
bool crr_hand(CrRelayTp *tp, const pjmedia_transport_udp_relay_info &info, CrShard *sh) {
    std::lock_guard<std::mutex> lock(sh->mu);
    if (tp->shard == sh) {
        std::memcpy(&tp->rem_rtp, &info.rem_rtp_addr, sizeof(pj_sockaddr));
        std::memcpy(&tp->rem_rtcp, &info.rem_rtcp_addr, sizeof(pj_sockaddr));
        tp->addr_len = info.addr_len;
        return true;
    }
    tp->rtp_key = info.rtp_key;
    tp->rtcp_key = info.rtcp_key;
    tp->rtp_fd = (int)info.rtp_sock;
    tp->rtcp_fd = (int)info.rtcp_sock;
    std::memcpy(&tp->rem_rtp, &info.rem_rtp_addr, sizeof(pj_sockaddr));
    std::memcpy(&tp->rem_rtcp, &info.rem_rtcp_addr, sizeof(pj_sockaddr));
    tp->addr_len = info.addr_len;
    tp->rtp_slot = crr_slot(sh, tp, false);
    tp->rtcp_slot = crr_slot(sh, tp, true);
    bool ok = true;
    for (unsigned idx : {tp->rtp_slot, tp->rtcp_slot}) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = ((pj_uint64_t)sh->slots[idx].gen << 32) | idx;
        ok = ok && epoll_ctl(sh->epfd, EPOLL_CTL_ADD,
                             sh->slots[idx].rtcp ? tp->rtcp_fd : tp->rtp_fd, &ev) == 0;
    }
    tp->shard = sh;
    sh->legs++;
    return ok;
}

/* The lock of the relay thread that has `tp`, if one has it. crr_mu held. */
std::unique_lock<std::mutex> crr_lock_thread(CrRelayTp *tp) {
    return tp->shard ? std::unique_lock<std::mutex>(tp->shard->mu)
                     : std::unique_lock<std::mutex>();
}

/* The leg's plain UDP transport, when its packets can be moved by a relay thread: under
 * pjsua's SRTP adapter (always there, with its member's transport type) only while
 * SRTP is not in use; no RTCP mux. */
bool crr_handoff_info(CrRelayTp *tp, pjmedia_transport_udp_relay_info &info) {
    pjmedia_transport *udp = tp->slave;
    pjmedia_transport_info ti;
    pjmedia_transport_info_init(&ti);
    if (!udp || pjmedia_transport_get_info(udp, &ti) != PJ_SUCCESS)
        return false;
    for (unsigned i = 0; i < ti.specific_info_cnt; ++i) {
        if (ti.spc_info[i].type != PJMEDIA_TRANSPORT_TYPE_SRTP)
            continue;
        if (((const pjmedia_srtp_info *)ti.spc_info[i].buffer)->active)
            return false;
        if (ti.spc_info[i].tp == udp)
            udp = pjmedia_transport_srtp_get_member(udp);
    }
    if (!udp || udp->type != PJMEDIA_TRANSPORT_TYPE_UDP
        || pjmedia_transport_udp_get_relay_info(udp, &info) != PJ_SUCCESS)
        return false;
    return info.started && !info.rtcp_mux && info.rtp_key && info.rtcp_key
        && info.addr_len > 0 && pj_sockaddr_has_addr(&info.rem_rtp_addr)
        && pj_sockaddr_has_addr(&info.rem_rtcp_addr);
}

void crr_suspend(const std::vector<pj_ioqueue_key_t *> &keys, bool suspend) {  /* no locks */
    for (pj_ioqueue_key_t *key : keys)
        if (key)
            pj_ioqueue_suspend_key(key, suspend ? PJ_TRUE : PJ_FALSE);
}

void crr_unpair(CrRelayTp *tp, std::vector<pj_ioqueue_key_t *> &resume) {  /* crr_mu held */
    if (tp && tp->peer) {
        crr_unhand(tp->peer, resume);
        crr_unhand(tp, resume);
        tp->peer->peer = nullptr;
        tp->peer = nullptr;
        crr_pairs--;
    }
}

/* ---- packets ---------------------------------------------------------------------- */

/* Makes the RTP packet `p` from `from` what `to`'s far end is sent; false when it is
 * dropped instead. crr_mu or the pair's relay thread lock held. */
bool crr_prepare_rtp(CrRelayTp *from, CrRelayTp *to, pj_uint8_t *p, pj_ssize_t size) {
    if (!from->may_receive || !to->may_send || size < (pj_ssize_t)CR_RTP_HDR
        || size > (pj_ssize_t)CR_RTP_MAX || (p[0] >> 6) != 2
        || size < (pj_ssize_t)(CR_RTP_HDR + 4 * (p[0] & 0x0f)))
        return false;
    int pt = p[1] & 0x7f;
    bool event = from->event_in >= 0 && pt == from->event_in;
    if (event && to->event_out < 0)
        return false;  /* the far end did not negotiate telephone-event */
    if (to->dtmf.event >= 0)
        return false;  /* held back while the leg's own DTMF event is sent */
    int out = event ? to->event_out : (pt == from->pt_in ? to->pt_out : pt);
    p[1] = (pj_uint8_t)((p[1] & 0x80) | out);
    crr_rewrite(to->out, from, p, to->clock_rate, to->samples_per_packet);
    return true;
}

bool crr_prepare_rtcp(CrRelayTp *from, CrRelayTp *to, pj_uint8_t *p, pj_ssize_t size) {
    if (size < 8 || size > (pj_ssize_t)CR_RTP_MAX)
        return false;
    crr_rewrite_rtcp(to->out, &from->out, p, (pj_size_t)size);
    return true;
}

/* A packet that pjmedia delivered on `from` (its receive callback): relayed (or dropped)
 * when `from` is paired; false when it is not, and the packet is the stream's (passed on
 * outside the lock: the stream may send, which takes it again). A handed-off leg's
 * packets come this way only while the hand-off happens. */
bool crr_relay(CrRelayTp *from, pj_uint8_t *p, pj_ssize_t size, bool rtcp) {
    std::lock_guard<std::mutex> lock(crr_mu);
    CrRelayTp *to = from->peer;
    if (!to)
        return false;
    std::unique_lock<std::mutex> thread_lock = crr_lock_thread(from);
    bool ok = rtcp ? crr_prepare_rtcp(from, to, p, size) && pjmedia_transport_send_rtcp(
                         to->slave, p, (pj_size_t)size) == PJ_SUCCESS
                   : crr_prepare_rtp(from, to, p, size) && pjmedia_transport_send_rtp(
                         to->slave, p, (pj_size_t)size) == PJ_SUCCESS;
    (ok ? (rtcp ? crr_rtcp : crr_rtp) : crr_dropped)++;
    return true;
}

/* A relay thread: one datagram per ready socket and epoll event (level-triggered: a
 * socket with more queued is reported again by the next epoll_wait), sent on with one
 * sendto() from the other leg's socket of the same kind. recvfrom/sendto, not the
 * mmsg calls: a socket has one packet per ptime, and the plain calls copy no message
 * header in. Its lock is held for a whole epoll batch. */
void crr_move(CrShard *sh, CrSlot &slot) {
    static thread_local pj_uint8_t buf[CR_RTP_MAX + 1];
    CrRelayTp *from = slot.tp;
    bool rtcp = slot.rtcp;
    pj_ssize_t size = recvfrom(rtcp ? from->rtcp_fd : from->rtp_fd, buf, sizeof(buf),
                               MSG_DONTWAIT, nullptr, nullptr);
    if (size < 0)
        return;
    CrRelayTp *to = from->peer;
    bool ok = to && to->shard == sh  /* the prepares check the size */
        && (rtcp ? crr_prepare_rtcp(from, to, buf, size) : crr_prepare_rtp(from, to, buf, size));
    if (ok && sendto(rtcp ? to->rtcp_fd : to->rtp_fd, buf, (size_t)size, MSG_DONTWAIT,
                     (const sockaddr *)(rtcp ? &to->rem_rtcp : &to->rem_rtp),
                     (socklen_t)to->addr_len) == size)
        (rtcp ? sh->counts.rtcp : sh->counts.rtp)++;
    else
        sh->counts.dropped++;
}

void crr_thread(CrShard *sh) {
    epoll_event evs[128];
    for (;;) {
        int n = epoll_wait(sh->epfd, evs, 128, -1);
        if (n < 0) {
            if (errno != EINTR)
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
            continue;
        }
        std::lock_guard<std::mutex> lock(sh->mu);
        /* Each packet's system calls push the legs out of the cache: while one packet
         * moves, the receiving leg of the event two ahead is fetched, and the sending leg
         * of the next (found through the receiving leg fetched one packet before). */
        auto slot_of = [&](int i) -> CrSlot * {
            if (i >= n)
                return nullptr;
            unsigned idx = (unsigned)(evs[i].data.u64 & 0xffffffffu);
            return idx < sh->slots.size() ? &sh->slots[idx] : nullptr;
        };
        for (int i = 0; i < 2; ++i)
            if (CrSlot *first = slot_of(i); first && first->tp)
                __builtin_prefetch(&first->tp->peer);
        for (int i = 0; i < n; ++i) {
            if (CrSlot *later = slot_of(i + 2); later && later->tp)
                __builtin_prefetch(&later->tp->peer);
            if (CrSlot *next = slot_of(i + 1); next && next->tp && next->tp->peer) {
                __builtin_prefetch(&next->tp->peer->peer);
                __builtin_prefetch((const char *)&next->tp->peer->peer + 64);
            }
            CrSlot *slot = slot_of(i);
            if (slot && slot->tp && slot->gen == (pj_uint32_t)(evs[i].data.u64 >> 32))
                crr_move(sh, *slot);
        }
    }
}

void crr_on_rtp(pjmedia_tp_cb_param *param) {
    CrRelayTp *tp = (CrRelayTp *)param->user_data;
    if (crr_relay(tp, (pj_uint8_t *)param->pkt, param->size, false))
        return;
    if (tp->stream_rtp_cb2) {
        pjmedia_tp_cb_param cb;
        std::memcpy(&cb, param, sizeof(cb));
        cb.user_data = tp->stream_user_data;
        tp->stream_rtp_cb2(&cb);
    } else if (tp->stream_rtp_cb) {
        tp->stream_rtp_cb(tp->stream_user_data, param->pkt, param->size);
    }
}

void crr_on_rtcp(void *user_data, void *pkt, pj_ssize_t size) {
    CrRelayTp *tp = (CrRelayTp *)user_data;
    if (crr_relay(tp, (pj_uint8_t *)pkt, size, true))
        return;
    if (tp->stream_rtcp_cb)
        tp->stream_rtcp_cb(tp->stream_user_data, pkt, size);
}

/* ---- the transport adapter (pjmedia's transport_adapter_sample.c, plus the relay) */

pj_status_t crr_get_info(pjmedia_transport *tp, pjmedia_transport_info *info) {
    return pjmedia_transport_get_info(((CrRelayTp *)tp)->slave, info);
}

pj_status_t crr_attach2(pjmedia_transport *t, pjmedia_transport_attach_param *att) {
    CrRelayTp *tp = (CrRelayTp *)t;
    tp->stream_user_data = att->user_data;
    tp->stream_rtp_cb2 = att->rtp_cb2;
    tp->stream_rtp_cb = att->rtp_cb2 ? nullptr : att->rtp_cb;
    tp->stream_rtcp_cb = att->rtcp_cb;
    att->rtp_cb2 = &crr_on_rtp;
    att->rtp_cb = nullptr;
    att->rtcp_cb = &crr_on_rtcp;
    att->user_data = tp;
    pj_status_t status = pjmedia_transport_attach2(tp->slave, att);
    if (status != PJ_SUCCESS) {
        tp->stream_user_data = nullptr;
        tp->stream_rtp_cb = nullptr;
        tp->stream_rtp_cb2 = nullptr;
        tp->stream_rtcp_cb = nullptr;
    }
    return status;
}

void crr_detach(pjmedia_transport *t, void *strm) {
    CrRelayTp *tp = (CrRelayTp *)t;
    PJ_UNUSED_ARG(strm);
    if (tp->stream_user_data) {
        pjmedia_transport_detach(tp->slave, tp);
        tp->stream_user_data = nullptr;
        tp->stream_rtp_cb = nullptr;
        tp->stream_rtp_cb2 = nullptr;
        tp->stream_rtcp_cb = nullptr;
    }
}

/* The leg's own stream sends: swallowed while relayed, else one more source of the
 * leg's continuous stream. */
pj_status_t crr_send_rtp(pjmedia_transport *t, const void *pkt, pj_size_t size) {
    CrRelayTp *tp = (CrRelayTp *)t;
    const pj_uint8_t *in = (const pj_uint8_t *)pkt;
    if (size < CR_RTP_HDR || size > CR_RTP_MAX || (in[0] >> 6) != 2)
        return pjmedia_transport_send_rtp(tp->slave, pkt, size);
    std::lock_guard<std::mutex> lock(crr_mu);
    if (tp->peer)
        return PJ_SUCCESS;
    pj_uint8_t p[CR_RTP_MAX];
    std::memcpy(p, pkt, size);
    unsigned rate = tp->clock_rate ? tp->clock_rate : 8000;
    crr_rewrite(tp->out, tp, p, rate, tp->samples_per_packet ? tp->samples_per_packet : 160);
    return pjmedia_transport_send_rtp(tp->slave, p, size);
}

pj_status_t crr_send_rtcp(pjmedia_transport *t, const void *pkt, pj_size_t size) {
    CrRelayTp *tp = (CrRelayTp *)t;
    if (size > CR_RTP_MAX)
        return pjmedia_transport_send_rtcp(tp->slave, pkt, size);
    std::lock_guard<std::mutex> lock(crr_mu);
    if (tp->peer)
        return PJ_SUCCESS;
    pj_uint8_t p[CR_RTP_MAX];
    std::memcpy(p, pkt, size);
    if (tp->out.source == tp)  /* our stream is the source: its timestamps, shifted */
        crr_rewrite_rtcp(tp->out, nullptr, p, size);
    return pjmedia_transport_send_rtcp(tp->slave, p, size);
}

pj_status_t crr_send_rtcp2(pjmedia_transport *t, const pj_sockaddr_t *addr, unsigned addr_len,
                          const void *pkt, pj_size_t size) {
    return pjmedia_transport_send_rtcp2(((CrRelayTp *)t)->slave, addr, addr_len, pkt, size);
}

pj_status_t crr_media_create(pjmedia_transport *t, pj_pool_t *pool, unsigned options,
                            const pjmedia_sdp_session *rem, unsigned index) {
    return pjmedia_transport_media_create(((CrRelayTp *)t)->slave, pool, options, rem, index);
}

pj_status_t crr_encode_sdp(pjmedia_transport *t, pj_pool_t *pool, pjmedia_sdp_session *local,
                          const pjmedia_sdp_session *rem, unsigned index) {
    return pjmedia_transport_encode_sdp(((CrRelayTp *)t)->slave, pool, local, rem, index);
}

pj_status_t crr_media_start(pjmedia_transport *t, pj_pool_t *pool, const pjmedia_sdp_session *local,
                           const pjmedia_sdp_session *rem, unsigned index) {
    return pjmedia_transport_media_start(((CrRelayTp *)t)->slave, pool, local, rem, index);
}

pj_status_t crr_media_stop(pjmedia_transport *t) {
    return pjmedia_transport_media_stop(((CrRelayTp *)t)->slave);
}

pj_status_t crr_simulate_lost(pjmedia_transport *t, pjmedia_dir dir, unsigned pct) {
    return pjmedia_transport_simulate_lost(((CrRelayTp *)t)->slave, dir, pct);
}

void crr_on_destroy(void *arg) {  /* the group lock's last reference is gone */
    CrRelayTp *tp = (CrRelayTp *)arg;
    pj_pool_t *pool = tp->pool;
    tp->~CrRelayTp();  /* the DTMF queue's own memory */
    pj_pool_release(pool);
}

pj_status_t crr_destroy(pjmedia_transport *t) {
    CrRelayTp *tp = (CrRelayTp *)t;
    std::vector<pj_ioqueue_key_t *> resume;
    {
        std::lock_guard<std::mutex> lock(crr_mu);
        crr_unpair(tp, resume);
    }
    crr_suspend(resume, false);  /* back in pjmedia's set before the sockets close */
    if (tp->del_base)
        pjmedia_transport_close(tp->slave);
    if (tp->base.grp_lock)
        pj_grp_lock_dec_ref(tp->base.grp_lock);
    else
        crr_on_destroy(tp);
    return PJ_SUCCESS;
}

struct pjmedia_transport_op crr_op = {
    &crr_get_info, nullptr, &crr_detach, &crr_send_rtp, &crr_send_rtcp, &crr_send_rtcp2,
    &crr_media_create, &crr_encode_sdp, &crr_media_start, &crr_media_stop, &crr_simulate_lost,
    &crr_destroy, &crr_attach2,
};

pjmedia_transport *crr_create(pjmedia_transport *slave, bool del_base) {
    pj_pool_t *pool = pjmedia_endpt_create_pool(pjsua_get_pjmedia_endpt(), "crrelay%p", 512, 512);
    if (!pool)
        return slave;
    /* Pool memory is aligned to 8 bytes only; the struct wants its cache-line alignment. */
    std::uintptr_t raw = (std::uintptr_t)pj_pool_zalloc(pool, sizeof(CrRelayTp) + alignof(CrRelayTp));
    if (!raw) {
        pj_pool_release(pool);
        return slave;
    }
    std::uintptr_t at = (raw + alignof(CrRelayTp) - 1) & ~(std::uintptr_t)(alignof(CrRelayTp) - 1);
    CrRelayTp *tp = new ((void *)at) CrRelayTp();
    tp->pool = pool;
    pj_ansi_strxcpy(tp->base.name, pool->obj_name, sizeof(tp->base.name));
    tp->base.type = (pjmedia_transport_type)(PJMEDIA_TRANSPORT_TYPE_USER + 7);
    tp->base.op = &crr_op;
    tp->slave = slave;
    tp->del_base = del_base;
    tp->event_in = tp->event_out = -1;
    tp->rtp_fd = tp->rtcp_fd = -1;
    if (slave->grp_lock) {
        tp->base.grp_lock = slave->grp_lock;
        pj_grp_lock_add_ref(slave->grp_lock);
        pj_grp_lock_add_handler(slave->grp_lock, pool, tp, &crr_on_destroy);
    }
    return &tp->base;
}

pjmedia_transport *crr_on_create_media_transport(pjsua_call_id call_id, unsigned media_idx,
                                                pjmedia_transport *base_tp, unsigned flags) {
    /* pjsua2's own callback first: it may run the application's onIncomingCall. */
    pjmedia_transport *tp = crr_chained ? crr_chained(call_id, media_idx, base_tp, flags) : base_tp;
    if (!tp)
        return tp;
    if (tp != base_tp) /* something else wrapped it: it owns the base already */
        return crr_create(tp, true);
    return crr_create(tp, (flags & PJSUA_MED_TP_CLOSE_MEMBER) != 0);
}

/* ---- the SIP thread's side --------------------------------------------------------- */

struct CrLeg {
    CrRelayTp *tp = nullptr;
    pjmedia_stream *stream = nullptr;
    pjsua_conf_port_id slot = PJSUA_INVALID_ID;
    pjmedia_stream_info si{};
};

bool crr_leg(int call_id, CrLeg &leg) {  /* pjsua's lock held */
    if (call_id < 0 || call_id >= (int)pjsua_var.ua_cfg.max_calls)
        return false;
    pjsua_call *call = &pjsua_var.calls[call_id];
    if (!call->inv || call->audio_idx < 0 || call->audio_idx >= (int)call->med_cnt)
        return false;
    pjsua_call_media *med = &call->media[call->audio_idx];
    if (med->type != PJMEDIA_TYPE_AUDIO || !med->tp || med->tp->op != &crr_op)
        return false;
    leg.tp = (CrRelayTp *)med->tp;
    leg.stream = med->strm.a.stream;
    leg.slot = med->strm.a.conf_slot;
    if (!leg.stream || pjmedia_stream_get_info(leg.stream, &leg.si) != PJ_SUCCESS)
        return false;
    return leg.si.param != nullptr;
}

unsigned crr_ptime(const pjmedia_stream_info &si) {
    return si.param->setting.frm_per_pkt * si.param->info.frm_ptime;
}

unsigned crr_rtp_clock(const pjmedia_stream_info &si) {
    /* G.722's RTP clock is 8 kHz for its 16 kHz audio (RFC 3551 s4.5.2) */
    return si.fmt.pt == PJMEDIA_RTP_PT_G722 ? 8000 : si.fmt.clock_rate;
}

bool crr_same_codec(const CrLeg &a, const CrLeg &b) {
    return pj_stricmp(&a.si.fmt.encoding_name, &b.si.fmt.encoding_name) == 0
        && a.si.fmt.clock_rate == b.si.fmt.clock_rate
        && a.si.fmt.channel_cnt == b.si.fmt.channel_cnt
        && crr_ptime(a.si) == crr_ptime(b.si);
}

void crr_set(CrLeg &leg) {  /* crr_mu held */
    CrRelayTp *tp = leg.tp;
    const pjmedia_stream_info &si = leg.si;
    tp->may_receive = (si.dir & PJMEDIA_DIR_DECODING) != 0;
    tp->may_send = (si.dir & PJMEDIA_DIR_ENCODING) != 0;
    tp->pt_in = (int)si.rx_pt;
    tp->pt_out = (int)si.tx_pt;
    tp->event_in = si.rx_event_pt;
    tp->event_out = si.tx_event_pt;
    tp->clock_rate = crr_rtp_clock(si);
    tp->samples_per_packet = crr_ptime(si) * tp->clock_rate / 1000;
}

/* Pauses a relayed leg's stream and takes its port off the conference clock (the
 * switchboard would call into the paused stream every tick: engine patch 0007 lets a
 * disabled port be skipped), or undoes both. No relay lock: the stream and the
 * conference take their own. */
void crr_pause(CrLeg &leg, bool pause) {
    if (pause) {
        pjmedia_stream_pause(leg.stream, PJMEDIA_DIR_ENCODING_DECODING);
        leg.tp->paused = leg.stream;
        if (leg.slot != PJSUA_INVALID_ID)
            pjsua_conf_configure_port(leg.slot, PJMEDIA_PORT_DISABLE, PJMEDIA_PORT_DISABLE);
    } else if (leg.tp->paused == leg.stream) {
        if (leg.slot != PJSUA_INVALID_ID)
            pjsua_conf_configure_port(leg.slot, PJMEDIA_PORT_ENABLE, PJMEDIA_PORT_ENABLE);
        pjmedia_stream_resume(leg.stream, PJMEDIA_DIR_ENCODING_DECODING);
        leg.tp->paused = nullptr;
    }
}

}  // namespace

int crRelayInstall(int enabled, int threads) {
    crr_enabled = enabled != 0;
    for (int i = (int)crr_shards.size(); crr_enabled && i < threads; ++i) {
        CrShard *sh = new CrShard();
        sh->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (sh->epfd < 0) {
            delete sh;
            return -1;
        }
        std::thread thread(&crr_thread, sh);
        pthread_setname_np(thread.native_handle(), "relay");
        thread.detach();
        crr_shards.push_back(sh);
    }
    if (crr_installed)
        return 0;
    pjsua_data *var = pjsua_get_var();
    if (!var)
        return -1;
    crr_chained = var->ua_cfg.cb.on_create_media_transport;
    var->ua_cfg.cb.on_create_media_transport = &crr_on_create_media_transport;
    crr_installed = true;
    return 0;
}

int crRelayBridge(int call_a, int call_b) {
    CrLeg a, b;
    std::vector<pj_ioqueue_key_t *> resume;
    PJSUA_LOCK();
    bool ok_a = crr_leg(call_a, a), ok_b = crr_leg(call_b, b);
    bool relay = crr_enabled && ok_a && ok_b && a.tp != b.tp && crr_same_codec(a, b);
    if (!relay) {
        {
            std::lock_guard<std::mutex> lock(crr_mu);
            if (ok_a) crr_unpair(a.tp, resume);
            if (ok_b) crr_unpair(b.tp, resume);
        }
        crr_suspend(resume, false);
        if (ok_a) crr_pause(a, false);
        if (ok_b) crr_pause(b, false);
        PJSUA_UNLOCK();
        return 0;
    }
    /* Off the switchboard first (the conference calls into the streams under its own
     * lock, and they into the adapter: never hold the relay lock across it). */
    if (a.slot != PJSUA_INVALID_ID && b.slot != PJSUA_INVALID_ID) {
        pjsua_conf_disconnect(a.slot, b.slot);
        pjsua_conf_disconnect(b.slot, a.slot);
    }
    crr_pause(a, true);
    crr_pause(b, true);
    /* Plain UDP on both legs and relay threads running: the legs' sockets leave
     * pjmedia's epoll set for a relay thread's; otherwise pjmedia's media thread keeps
     * reading them and the adapter relays from its receive callback. */
    pjmedia_transport_udp_relay_info ia, ib;
    bool handoff = !crr_shards.empty() && crr_handoff_info(a.tp, ia) && crr_handoff_info(b.tp, ib);
    {
        std::lock_guard<std::mutex> lock(crr_mu);
        if (a.tp->peer != b.tp) {
            crr_unpair(a.tp, resume);
            crr_unpair(b.tp, resume);
            a.tp->peer = b.tp;
            b.tp->peer = a.tp;
            crr_pairs++;
        } else if (!handoff) {
            crr_unhand(a.tp, resume);
            crr_unhand(b.tp, resume);
        }
        std::unique_lock<std::mutex> thread_lock = crr_lock_thread(a.tp);
        crr_set(a);
        crr_set(b);
    }
    crr_suspend(resume, false);
    if (handoff) {
        std::vector<pj_ioqueue_key_t *> keys = {ia.rtp_key, ia.rtcp_key, ib.rtp_key, ib.rtcp_key};
        bool suspended = true;
        for (pj_ioqueue_key_t *key : keys)
            suspended = suspended && pj_ioqueue_suspend_key(key, PJ_TRUE) == PJ_SUCCESS;
        bool handed = false;
        if (suspended) {
            std::lock_guard<std::mutex> lock(crr_mu);
            if (a.tp->peer == b.tp) {
                CrShard *sh = a.tp->shard;  /* the pair's thread, else the least busy */
                for (CrShard *s : crr_shards)
                    if (!a.tp->shard && (!sh || s->legs < sh->legs))
                        sh = s;
                handed = crr_hand(a.tp, ia, sh) && crr_hand(b.tp, ib, sh);
                if (!handed) {
                    crr_unhand(a.tp, resume);
                    crr_unhand(b.tp, resume);
                }
            }
        }
        if (!handed)
            crr_suspend(keys, false);
    }
    PJSUA_UNLOCK();
    return 1;
}

int crRelayDtmf(int call_id, const std::string &digit) {
    CrLeg leg;
    int code = digit.size() == 1 ? crr_event_code(digit[0]) : -1;
    int queued = 0;
    PJSUA_LOCK();  /* held throughout: the leg's transport lives while it is */
    if (code >= 0 && crr_leg(call_id, leg)) {
        std::lock_guard<std::mutex> lock(crr_mu);
        if (leg.tp->peer && leg.tp->event_out >= 0) {
            if (leg.tp->dtmf.queued.size() < 64)
                leg.tp->dtmf.queued.push_back(code);
            crr_dtmf_schedule(leg.tp, call_id);
            queued = 1;
        }
    }
    PJSUA_UNLOCK();
    return queued;
}

std::string crRelayCodecOf(int call_id) {
    std::string name;
    PJSUA_LOCK();
    CrLeg leg;
    if (crr_leg(call_id, leg)) {
        name.assign(leg.si.fmt.encoding_name.ptr, leg.si.fmt.encoding_name.slen);
    } else if (call_id >= 0 && call_id < (int)pjsua_var.ua_cfg.max_calls) {
        pjsua_call *call = &pjsua_var.calls[call_id];
        const pjmedia_sdp_session *offer = nullptr;
        if (call->inv && call->inv->neg
            && pjmedia_sdp_neg_get_state(call->inv->neg) == PJMEDIA_SDP_NEG_STATE_REMOTE_OFFER)
            pjmedia_sdp_neg_get_neg_remote(call->inv->neg, &offer);
        for (unsigned m = 0; offer && m < offer->media_count && name.empty(); ++m) {
            const pjmedia_sdp_media *media = offer->media[m];
            if (pj_strcmp2(&media->desc.media, "audio") != 0 || media->desc.port == 0)
                continue;
            for (unsigned f = 0; f < media->desc.fmt_count && name.empty(); ++f) {
                const pj_str_t &fmt = media->desc.fmt[f];
                if (pj_strcmp2(&fmt, "0") == 0)
                    name = "PCMU";
                else if (pj_strcmp2(&fmt, "8") == 0)
                    name = "PCMA";
                else if (pj_strcmp2(&fmt, "9") == 0)
                    name = "G722";
                else {
                    const pjmedia_sdp_attr *attr = pjmedia_sdp_media_find_attr2(media, "rtpmap", &fmt);
                    pjmedia_sdp_rtpmap rtpmap;
                    if (attr && pjmedia_sdp_attr_get_rtpmap(attr, &rtpmap) == PJ_SUCCESS
                        && pj_stricmp2(&rtpmap.enc_name, "telephone-event") != 0)
                        name.assign(rtpmap.enc_name.ptr, rtpmap.enc_name.slen);
                }
            }
        }
    }
    PJSUA_UNLOCK();
    return name;
}

unsigned crRelayPairs() { return crr_pairs.load(); }
static unsigned long crr_count(unsigned long CrCounts::*field, const std::atomic<unsigned long> &own) {
    unsigned long total = own.load();
    for (CrShard *sh : crr_shards) {
        std::lock_guard<std::mutex> lock(sh->mu);
        total += sh->counts.*field;
    }
    return total;
}
unsigned long crRelayRtp() { return crr_count(&CrCounts::rtp, crr_rtp); }
unsigned long crRelayRtcp() { return crr_count(&CrCounts::rtcp, crr_rtcp); }
unsigned long crRelayDropped() { return crr_count(&CrCounts::dropped, crr_dropped); }
unsigned long crRelayDtmfEvents() { return crr_dtmf_events.load(); }

unsigned crRelayThreadPairs() {
    unsigned legs = 0;
    for (CrShard *sh : crr_shards) {
        std::lock_guard<std::mutex> lock(sh->mu);
        legs += sh->legs;
    }
    return legs / 2;
}

unsigned long crRelayThreadPackets() {
    unsigned long total = 0;
    for (CrShard *sh : crr_shards) {
        std::lock_guard<std::mutex> lock(sh->mu);
        total += sh->counts.rtp + sh->counts.rtcp;
    }
    return total;
}

#endif  /* PJ_VERSION_NUM */
