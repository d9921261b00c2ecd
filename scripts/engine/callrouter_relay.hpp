/*
 * callrouter_relay: RTP/RTCP packet relay between the two legs of a bridged call.
 *
 * How it works: every call's media transport is wrapped in a small pjmedia transport
 * adapter (installed as pjsua's on_create_media_transport, chained after pjsua2's own).
 * Normally the adapter passes packets between the UDP transport and the leg's
 * pjmedia stream unchanged, and the legs are joined on the audio switchboard
 * (decode, conference clock, encode). When the router bridges two legs whose streams
 * negotiated the same codec, clock rate, channels and ptime, crRelayBridge() pairs
 * their adapters instead, with no decoding, jitter buffer or conference clock. Both
 * streams are paused and their own output is swallowed while the pair lasts.
 *
 * Who moves the packets: when both legs are plain UDP (pjsua's SRTP adapter not in use,
 * no RTCP mux), the pair is handed to a relay thread. Its four sockets leave pjmedia's
 * epoll set (pj_ioqueue_suspend_key, engine patch 0006; pjmedia's pending reads stay
 * posted) for the thread's own epoll set; the thread reads one datagram per ready
 * socket and sends it on with sendto() from the other leg's socket of the same kind to
 * that leg's remote address (pjmedia_transport_udp_get_relay_info). When the pair ends
 * the sockets leave the thread and go back to pjmedia before anything can close them.
 * Otherwise, and for a packet pjmedia had already taken while a pair was handed over, a
 * packet is relayed from inside the adapter's receive callback on pjmedia's media
 * thread, through the other leg's transport.
 *
 * What the far end of a leg receives stays one RTP stream for the leg's whole life:
 * the first SSRC it saw is kept, and when the source changes (the relay starts or
 * stops, a transfer brings a new far leg, a re-INVITE restarts a stream) sequence
 * numbers and timestamps continue from the last packet sent (marker bit set on the
 * first packet of the new source). Payload types are mapped between the legs'
 * negotiated numbers (RFC 4733 telephone-event included; dropped towards a leg that
 * did not negotiate it). RTCP is relayed too, with the sender SSRC, the SR's RTP
 * timestamp and the report blocks' SSRC and highest sequence translated the same way.
 * Packets are relayed only in the directions both legs' SDP allow (hold).
 *
 * DTMF that reaches the router as SIP INFO is sent towards a relayed leg as RFC 4733
 * events (crRelayDtmf) in the leg's own stream (its SSRC, the next sequence numbers, a
 * timestamp where the stream is now), one packet per ptime from a pjsua timer, so it
 * goes out whether or not the other side sends audio; relayed audio towards that leg is
 * held back while an event lasts, as pjmedia's own stream does.
 *
 * Threading: crRelayBridge/crRelayDtmf and the DTMF timer run on the SIP thread; packets
 * are handled on the relay threads, pjmedia's media thread and (for a stream's own
 * packets) the conference clock thread. The relay mutex guards the pairing and the
 * per-leg state; a handed-over pair's state is changed only with its relay thread's
 * lock held too, which the thread holds for one epoll batch. Lock order: pjsua's lock ->
 * conference -> relay mutex -> relay thread lock, and pjlib's key locks never under
 * either relay lock. An epoll event carries a slot number and its generation, so an
 * event for a socket taken back since is skipped. The callback path counts in atomics,
 * a relay thread under its lock.
 */
#ifndef CALLROUTER_RELAY_HPP
#define CALLROUTER_RELAY_HPP
#include <string>

/* Wrap every new call's media transport; `enabled` 0 keeps every bridge on the audio
 * switchboard (sip.media_relay = false). `threads` relay threads move the packets of
 * relayed legs on plain UDP (sip.media_relay_threads). Call once, after libInit,
 * before any call; 0 on success. */
int crRelayInstall(int enabled, int threads);
/* Join the audio of two calls: 1 when their packets are now relayed, 0 when the codecs
 * differ (or the relay is off): then the caller joins their conference ports. */
int crRelayBridge(int call_a, int call_b);
/* Send `digit` (0-9 * # A-D) as RFC 4733 events towards a relayed call: 1 when queued,
 * 0 when the call is not relayed (then pjsua's own dialDtmf applies). */
int crRelayDtmf(int call_id, const std::string &digit);
/* The audio codec a call uses ("PCMA"), or before its answer the first one its remote
 * offer lists; "" when neither is known. The router offers it first to the leg it
 * dials for that call, so the two legs usually agree and can be relayed. */
std::string crRelayCodecOf(int call_id);
unsigned crRelayPairs();
/* Relayed calls whose packets relay threads move, and the packets they sent. */
unsigned crRelayThreadPairs();
unsigned long crRelayThreadPackets();
unsigned long crRelayRtp();
unsigned long crRelayRtcp();
unsigned long crRelayDropped();
unsigned long crRelayDtmfEvents();

#endif
