/*
 * pjproject compile-time configuration for callrouter.
 *
 * Why: the PyPI pjsua2 build caps concurrent calls at 4 and uses a 64-handle
 * select() ioqueue (see docs/architecture.md, "The engine"). A router bridges
 * each inbound call to an outbound leg, so every bridged call costs two pjsua
 * calls, two conference ports and four sockets (RTP + RTCP per leg).
 *
 * Changing anything here changes the engine cache key (scripts/build-engine.sh).
 */
#ifndef CALLROUTER_CONFIG_SITE_H
#define CALLROUTER_CONFIG_SITE_H

/* 2048 pjsua calls = 1024 bridged calls of two legs each. */
#define PJSUA_MAX_CALLS                 2048
/* One conference port per call plus the master port and spares. */
#define PJSUA_MAX_CONF_PORTS            4096
/* Four sockets per bridged-call leg pair plus SIP transports: epoll handles. */
#define PJ_IOQUEUE_MAX_HANDLES          8192
#define PJ_IOQUEUE_MAX_EVENTS_IN_SINGLE_POLL 64
/* Plain level-triggered epoll. pjlib's default (PJ_IOQUEUE_EPOLL_AUTO) registers every
 * socket with EPOLLEXCLUSIVE, for several threads polling one ioqueue, and then re-arms a
 * socket after each event with EPOLL_CTL_DEL + EPOLL_CTL_ADD (EXCLUSIVE cannot be
 * MODded): two syscalls and an epoll item freed and allocated per RTP packet received.
 * Each of the router's ioqueues has one polling thread (the SIP thread; pjmedia's media
 * worker), so there is no herd to keep off: perf showed that re-arming as a fifth of the
 * media thread's time while it relayed packets. */
#define PJ_IOQUEUE_DEFAULT_EPOLL_FLAGS  0
/* Transaction and dialog hash tables sized for a router, not a phone. */
#define PJSIP_MAX_TSX_COUNT             65535
#define PJSIP_MAX_DIALOG_COUNT          65535
/* Receive bursts of INVITEs without dropping datagrams in the kernel. */
#define PJSIP_UDP_SO_RCVBUF_SIZE        (4 * 1024 * 1024)
#define PJSIP_UDP_SO_SNDBUF_SIZE        (4 * 1024 * 1024)
/* A failed pjlib assertion must not abort a carrier-facing process: with PJ_DEBUG 0
 * (and -DNDEBUG from the build script) pj_assert logs "Assert failed" at level 1 and
 * PJ_ASSERT_RETURN returns its error (2.13+); the router counts those log lines
 * (callrouter_engine_assertions_total). Defined here, not only in CFLAGS, so the
 * libraries and the SWIG wrapper see the same PJ_DEBUG. Asterisk's bundled build
 * does the same. Fuzz builds (scripts/fuzz.sh) keep assertions fatal.
 * See docs/engine.md, "Assertions". */
#ifndef PJ_DEBUG
#  define PJ_DEBUG                      0
#endif
/* A request goes out on the transport its destination names (a sip: URI without
 * ;transport= means UDP), whatever its size. pjsip's default tries TCP first for a
 * request of 1,300 bytes or more (RFC 3261 s18.1.1): an INVITE to a UDP-only runtime
 * then fails, or, when the kernel gave pjsip's TCP socket the runtime's own port as its
 * local port, connects to itself and reads its own INVITE back (a 503 for every later
 * call to that runtime). Asterisk's res_pjsip turns the switch off the same way
 * (disable_tcp_switch). */
#define PJSIP_DONT_SWITCH_TO_TCP        1
/* IPv6 listeners and media (RFC 5118); 2.17's default is off. */
#define PJ_HAS_IPV6                     1
/* Receive any UDP datagram whole (65,507 bytes of payload) and TCP messages up to
 * 65,535 bytes: a 4.5 KB INVITE (STIR/SHAKEN Identity, long SDP) cut at pjsip's
 * default 4,000 bytes arrived without its body. What the router accepts is the
 * runtime setting sip.max_message_bytes (the guard answers 513 above it); this is
 * only what the transport can read. Outgoing messages are printed into a 4,000-byte
 * buffer first (patch 0003), so this does not cost 64 KB per transaction. */
#define PJSIP_MAX_PKT_LEN               65535
/* The router never mixes: each leg hears exactly one other leg. The audio switchboard
 * routes frames 1:1 without the conference bridge's mixing and level stages (both
 * legs must then share a clock rate: the router offers 8 kHz codecs only). */
#define PJMEDIA_CONF_USE_SWITCH_BOARD   1
/* pjsua accounts: the router's own, one per registration trunk and one per trunk user
 * that transfers or outbound calls authenticate as (sip/trunks.py). pjsua's default of
 * 8 would stop the ninth with PJ_ETOOMANY; each costs a few KB of static state. */
#define PJSUA_MAX_ACC                   256
/* Media lines a pjsua call can use (pjsua's default: PJMEDIA_MAX_SDP_MEDIA, 16; made
 * overridable by patch 0004). pjsua_call holds two arrays of this many pjsua_call_media
 * (656 bytes each), and pjsua_init allocates and zeroes all PJSUA_MAX_CALLS of them at
 * start: 16 cost 21.8 KB per call slot, 44.6 MB for 2048 slots, resident from the first
 * second. A bridged leg uses one audio line; 4 leave room for audio with video, BFCP and
 * text (6.1 KB per slot, 12.4 MB). The SDP parser still reads 16 lines: the lines of an
 * offer beyond the fourth are answered with port 0 by the SDP negotiator (RFC 3264: as
 * many lines as the offer), and pjsua's two checks of that count allow for the cap
 * (patch 0004). An offer whose only audio line comes after the fourth gets no audio.
 * sipp-scenarios/uac-call-bridged-many-media.xml sends six. */
#define PJSUA_MAX_CALL_MEDIA            4
/* No video, no players/recorders beyond a handful. */
#define PJMEDIA_HAS_VIDEO               0
#define PJSUA_MAX_PLAYERS               8
#define PJSUA_MAX_RECORDERS             8

#endif
