// The load for relay.cc: N callers and N runtimes on loopback, like bench/run.py's held
// step. Caller i (GEN_BASE + 2i) sends a 172-byte RTP packet every 20 ms to the relay's
// socket A_i (RELAY_BASE + 2i) and never reads (as SIPp's rtp_stream); runtime i
// (GEN_BASE + 2i + 1) echoes whatever reaches it back to where it came from (as SIPp's
// rtp_echo), one thread for all of them.
//
// usage: gen N RELAY_BASE GEN_BASE SECONDS
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <thread>
#include <vector>

#include "loopback.hpp"

static int bound(int port) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    sockaddr_in a = loopback(port);
    if (s < 0 || bind(s, (sockaddr *)&a, sizeof a) != 0) {
        perror("bind");
        exit(1);
    }
    return s;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s N RELAY_BASE GEN_BASE SECONDS\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]), relay_base = atoi(argv[2]), gen_base = atoi(argv[3]);
    int seconds = atoi(argv[4]);
    std::vector<int> callers(n), runtimes(n);
    for (int i = 0; i < n; ++i) {
        callers[i] = bound(gen_base + 2 * i);
        runtimes[i] = bound(gen_base + 2 * i + 1);
    }
    time_t end = time(nullptr) + seconds + 1;
    std::thread echo([&] {
        int ep = epoll_create1(0);
        for (int i = 0; i < n; ++i) {
            epoll_event e{};
            e.events = EPOLLIN;
            e.data.u32 = (uint32_t)i;
            epoll_ctl(ep, EPOLL_CTL_ADD, runtimes[i], &e);
        }
        epoll_event events[256];
        char buf[2048];
        while (time(nullptr) < end) {
            int k = epoll_wait(ep, events, 256, 100);
            for (int j = 0; j < k; ++j) {
                int s = runtimes[events[j].data.u32];
                sockaddr_in from;
                socklen_t len = sizeof from;
                ssize_t size;
                while ((size = recvfrom(s, buf, sizeof buf, 0, (sockaddr *)&from, &len)) >= 0)
                    sendto(s, buf, (size_t)size, 0, (sockaddr *)&from, len);
            }
        }
    });
    unsigned char packet[172] = {0x80, 0};  // RTP v2, PCMU
    timespec tick;
    clock_gettime(CLOCK_MONOTONIC, &tick);
    for (int round = 0; round < seconds * 50; ++round) {
        for (int i = 0; i < n; ++i) {
            uint16_t seq = htons((uint16_t)round);
            uint32_t ts = htonl((uint32_t)round * 160), ssrc = htonl((uint32_t)i);
            memcpy(packet + 2, &seq, 2);
            memcpy(packet + 4, &ts, 4);
            memcpy(packet + 8, &ssrc, 4);
            sockaddr_in to = loopback(relay_base + 2 * i);
            sendto(callers[i], packet, sizeof packet, 0, (sockaddr *)&to, sizeof to);
        }
        tick.tv_nsec += 20000000;
        if (tick.tv_nsec >= 1000000000) {
            tick.tv_nsec -= 1000000000;
            tick.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &tick, nullptr);
    }
    echo.join();
}
