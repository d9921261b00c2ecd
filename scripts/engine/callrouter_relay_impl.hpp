/* Implementation of callrouter_relay.hpp; see that file for how it works. */
#include "callrouter_relay.hpp"
#include <pjmedia.h>
#include <pjsua-lib/pjsua.h>
#include <pjsua-lib/pjsua_internal.h>

/* The relay needs pjmedia transports with group locks (their lifetime across threads)
 * and pjlib of 2.14 or later. The 2.12.1 fallback engine, built on explicit request
 * only (docs/engine.md), gets no relay: every bridge stays on the audio switchboard. */
#if PJ_VERSION_NUM < ((2 << 24) | (14 << 16))
int crRelayInstall(int) { return 0; }
int crRelayBridge(int, int) { return 0; }
int crRelayDtmf(int, const std::string &) { return 0; }
std::string crRelayCodecOf(int) { return std::string(); }
unsigned crRelayPairs() { return 0; }
unsigned long crRelayRtp() { return 0; }
unsigned long crRelayRtcp() { return 0; }
unsigned long crRelayDropped() { return 0; }
unsigned long crRelayDtmfEvents() { return 0; }
#else
#include <atomic>
#include <cstring>
#include <deque>
#include <mutex>

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
    bool have = false;          /* a packet was sent: ssrc/last_* are set */
    pj_uint32_t ssrc = 0;       /* the SSRC the far end sees */
    pj_uint16_t last_seq = 0;
    pj_uint32_t last_ts = 0;
    pj_timestamp last_at{};     /* when last_ts was sent */
    const void *source = nullptr;  /* the leg's own stream (its adapter) or the peer */
    pj_uint32_t in_ssrc = 0;    /* the current source's SSRC */
    pj_uint16_t seq_off = 0;    /* added to the source's sequence numbers */
    pj_uint32_t ts_off = 0;     /* added to the source's timestamps */
};

/* RFC 4733 events sent towards a relayed leg for SIP INFO DTMF (crRelayDtmf): one packet
 * per ptime from a pjsua timer on the SIP thread, whether or not audio is being relayed
 * to that leg; relayed audio towards it is held back while an event lasts. */
struct CrDtmf {
    std::deque<int> queued;     /* event codes waiting */
    int event = -1;             /* the event being sent, -1 = none */
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
    /* Guarded by crr_mu. */
    CrRelayTp *peer;            /* relayed to/from this leg; null = the stream's path */
    bool may_receive;           /* the far end sends to us (our SDP allows it) */
    bool may_send;              /* we send to the far end */
    int pt_in, pt_out;          /* the codec's payload type from / to the far end */
    int event_in, event_out;    /* telephone-event payload types, -1 = not negotiated */
    unsigned clock_rate;        /* RTP clock */
    unsigned samples_per_packet;
    pjmedia_stream *paused;     /* the stream we paused for the relay */
    CrOut out;
    CrDtmf dtmf;
};

std::mutex crr_mu;
bool crr_enabled = true;
bool crr_installed = false;
pjmedia_transport *(*crr_chained)(pjsua_call_id, unsigned, pjmedia_transport *, unsigned) = nullptr;
std::atomic<unsigned> crr_pairs(0);
std::atomic<unsigned long> crr_rtp(0), crr_rtcp(0), crr_dropped(0), crr_dtmf_events(0);

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

void crr_unpair(CrRelayTp *tp) {  /* crr_mu held */
    if (tp && tp->peer) {
        tp->peer->peer = nullptr;
        tp->peer = nullptr;
        crr_pairs--;
    }
}

/* ---- packets ---------------------------------------------------------------------- */

/* A packet that arrived on `from`: relayed (or dropped) when `from` is paired; false
 * when it is not, and the packet is the stream's (passed on outside the lock: the stream
 * may send, which takes it again). */
bool crr_relay_rtp(CrRelayTp *from, pj_uint8_t *p, pj_ssize_t size) {
    std::lock_guard<std::mutex> lock(crr_mu);
    CrRelayTp *to = from->peer;
    if (!to)
        return false;
    if (!from->may_receive || !to->may_send || size < (pj_ssize_t)CR_RTP_HDR
        || size > (pj_ssize_t)CR_RTP_MAX || (p[0] >> 6) != 2
        || size < (pj_ssize_t)(CR_RTP_HDR + 4 * (p[0] & 0x0f))) {
        crr_dropped++;
        return true;
    }
    int pt = p[1] & 0x7f;
    bool event = from->event_in >= 0 && pt == from->event_in;
    if (event && to->event_out < 0) {
        crr_dropped++;  /* the far end did not negotiate telephone-event */
        return true;
    }
    if (to->dtmf.event >= 0) {
        crr_dropped++;  /* held back while the leg's own DTMF event is sent */
        return true;
    }
    int out = event ? to->event_out : (pt == from->pt_in ? to->pt_out : pt);
    p[1] = (pj_uint8_t)((p[1] & 0x80) | out);
    crr_rewrite(to->out, from, p, to->clock_rate, to->samples_per_packet);
    if (pjmedia_transport_send_rtp(to->slave, p, (pj_size_t)size) == PJ_SUCCESS)
        crr_rtp++;
    else
        crr_dropped++;
    return true;
}

bool crr_relay_rtcp(CrRelayTp *from, pj_uint8_t *p, pj_ssize_t size) {  /* as above */
    std::lock_guard<std::mutex> lock(crr_mu);
    CrRelayTp *to = from->peer;
    if (!to)
        return false;
    if (size < 8 || size > (pj_ssize_t)CR_RTP_MAX) {
        crr_dropped++;
        return true;
    }
    crr_rewrite_rtcp(to->out, &from->out, p, (pj_size_t)size);
    if (pjmedia_transport_send_rtcp(to->slave, p, (pj_size_t)size) == PJ_SUCCESS)
        crr_rtcp++;
    else
        crr_dropped++;
    return true;
}

void crr_on_rtp(pjmedia_tp_cb_param *param) {
    CrRelayTp *tp = (CrRelayTp *)param->user_data;
    if (crr_relay_rtp(tp, (pj_uint8_t *)param->pkt, param->size))
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
    if (crr_relay_rtcp(tp, (pj_uint8_t *)pkt, size))
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
    {
        std::lock_guard<std::mutex> lock(crr_mu);
        crr_unpair(tp);
    }
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
    CrRelayTp *tp = new (pj_pool_zalloc(pool, sizeof(CrRelayTp))) CrRelayTp();
    tp->pool = pool;
    pj_ansi_strxcpy(tp->base.name, pool->obj_name, sizeof(tp->base.name));
    tp->base.type = (pjmedia_transport_type)(PJMEDIA_TRANSPORT_TYPE_USER + 7);
    tp->base.op = &crr_op;
    tp->slave = slave;
    tp->del_base = del_base;
    tp->event_in = tp->event_out = -1;
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

void crr_pause(CrLeg &leg, bool pause) {  /* no relay lock: the stream takes its own */
    if (pause) {
        pjmedia_stream_pause(leg.stream, PJMEDIA_DIR_ENCODING_DECODING);
        leg.tp->paused = leg.stream;
    } else if (leg.tp->paused == leg.stream) {
        pjmedia_stream_resume(leg.stream, PJMEDIA_DIR_ENCODING_DECODING);
        leg.tp->paused = nullptr;
    }
}

}  // namespace

int crRelayInstall(int enabled) {
    crr_enabled = enabled != 0;
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
    PJSUA_LOCK();
    bool ok_a = crr_leg(call_a, a), ok_b = crr_leg(call_b, b);
    bool relay = crr_enabled && ok_a && ok_b && a.tp != b.tp && crr_same_codec(a, b);
    if (!relay) {
        {
            std::lock_guard<std::mutex> lock(crr_mu);
            if (ok_a) crr_unpair(a.tp);
            if (ok_b) crr_unpair(b.tp);
        }
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
    {
        std::lock_guard<std::mutex> lock(crr_mu);
        if (a.tp->peer != b.tp) {
            crr_unpair(a.tp);
            crr_unpair(b.tp);
            a.tp->peer = b.tp;
            b.tp->peer = a.tp;
            crr_pairs++;
        }
        crr_set(a);
        crr_set(b);
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
unsigned long crRelayRtp() { return crr_rtp.load(); }
unsigned long crRelayRtcp() { return crr_rtcp.load(); }
unsigned long crRelayDropped() { return crr_dropped.load(); }
unsigned long crRelayDtmfEvents() { return crr_dtmf_events.load(); }

#endif  /* PJ_VERSION_NUM */
