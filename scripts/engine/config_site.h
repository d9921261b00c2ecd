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
/* Transaction and dialog hash tables sized for a router, not a phone. */
#define PJSIP_MAX_TSX_COUNT             65535
#define PJSIP_MAX_DIALOG_COUNT          65535
/* Receive bursts of INVITEs without dropping datagrams in the kernel. */
#define PJSIP_UDP_SO_RCVBUF_SIZE        (4 * 1024 * 1024)
#define PJSIP_UDP_SO_SNDBUF_SIZE        (4 * 1024 * 1024)
/* The router never mixes: each leg hears exactly one other leg. The audio switchboard
 * routes frames 1:1 without the conference bridge's mixing and level stages (both
 * legs must then share a clock rate: the router offers 8 kHz codecs only). */
#define PJMEDIA_CONF_USE_SWITCH_BOARD   1
/* No video, no players/recorders beyond a handful. */
#define PJMEDIA_HAS_VIDEO               0
#define PJSUA_MAX_PLAYERS               8
#define PJSUA_MAX_RECORDERS             8

#endif
