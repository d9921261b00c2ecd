// The relay thread's loop alone, to compare ways of moving datagrams without the engine
// (docs/benchmarks.md, "The packet relay (issue 13)"): N pairs of UDP sockets on
// loopback; a datagram arriving on A_i (RELAY_BASE + 2i) leaves from B_i to runtime i
// (GEN_BASE + 2i + 1), one arriving on B_i leaves from A_i to caller i (GEN_BASE + 2i),
// with an SSRC rewrite as a stand-in for the relay's. Prints the CPU per datagram moved.
//
//   epoll:  epoll_wait (level-triggered) + one recvfrom + one sendto per datagram, as
//           scripts/engine/callrouter_relay_impl.hpp does;
//   uring:  io_uring: a multishot receive per socket into a provided-buffer ring, sends
//           with the destination address, registered files, DEFER_TASKRUN; MIN_WAIT
//           completions or NAP_US microseconds per io_uring_enter (1 0: no batching).
//
// A second, idle thread makes file lookups those of a threaded process (as the router).
// usage: relay epoll|uring N RELAY_BASE GEN_BASE SECONDS [MIN_WAIT NAP_US]
// build: g++ -O2 -o relay relay.cc -luring -lpthread   (Debian: liburing-dev)
#include <liburing.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <thread>
#include <vector>

#include "loopback.hpp"

struct Leg {
    int fd;
    sockaddr_in remote;  // where datagrams leaving from this socket go
    int peer;            // the other leg of the pair
};

static void rewrite(unsigned char *p) {  // the SSRC, as the relay rewrites it
    uint32_t ssrc;
    memcpy(&ssrc, p + 8, 4);
    ssrc ^= 0x1234;
    memcpy(p + 8, &ssrc, 4);
}

static uint64_t move_epoll(std::vector<Leg> &legs, time_t end) {
    int ep = epoll_create1(0);
    for (size_t i = 0; i < legs.size(); ++i) {
        epoll_event e{};
        e.events = EPOLLIN;
        e.data.u32 = (uint32_t)i;
        epoll_ctl(ep, EPOLL_CTL_ADD, legs[i].fd, &e);
    }
    epoll_event events[128];
    unsigned char buf[1500];
    uint64_t moved = 0;
    while (time(nullptr) < end) {
        int k = epoll_wait(ep, events, 128, 100);
        for (int j = 0; j < k; ++j) {
            Leg &from = legs[events[j].data.u32];
            ssize_t size = recvfrom(from.fd, buf, sizeof buf, MSG_DONTWAIT, nullptr, nullptr);
            if (size < 12)
                continue;
            Leg &to = legs[from.peer];
            rewrite(buf);
            if (sendto(to.fd, buf, (size_t)size, MSG_DONTWAIT, (sockaddr *)&to.remote,
                       sizeof to.remote) == size)
                moved++;
        }
    }
    return moved;
}

static uint64_t move_uring(std::vector<Leg> &legs, time_t end, unsigned min_wait, long nap_us) {
    io_uring ring;
    io_uring_params params{};
    params.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQSIZE;
    params.cq_entries = 16384;
    int rc = io_uring_queue_init_params(4096, &ring, &params);
    if (rc != 0) {
        fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-rc));
        exit(1);
    }
    std::vector<int> fds;
    for (Leg &leg : legs)
        fds.push_back(leg.fd);
    if ((rc = io_uring_register_files(&ring, fds.data(), (unsigned)fds.size())) != 0) {
        fprintf(stderr, "io_uring_register_files: %s\n", strerror(-rc));
        exit(1);
    }
    const unsigned count = 8192, size = 2048;  // provided buffers (liburing 2.3: by hand)
    auto *br = (io_uring_buf_ring *)aligned_alloc(4096, count * sizeof(io_uring_buf));
    io_uring_buf_ring_init(br);
    io_uring_buf_reg reg{};
    reg.ring_addr = (unsigned long)br;
    reg.ring_entries = count;
    reg.bgid = 0;
    if ((rc = io_uring_register_buf_ring(&ring, &reg, 0)) != 0) {
        fprintf(stderr, "io_uring_register_buf_ring: %s\n", strerror(-rc));
        exit(1);
    }
    auto *pool = (unsigned char *)aligned_alloc(4096, (size_t)count * size);
    for (unsigned i = 0; i < count; ++i)
        io_uring_buf_ring_add(br, pool + (size_t)i * size, size, (unsigned short)i,
                              io_uring_buf_ring_mask(count), (int)i);
    io_uring_buf_ring_advance(br, (int)count);
    auto sqe = [&] {
        io_uring_sqe *q = io_uring_get_sqe(&ring);
        if (!q) {
            io_uring_submit(&ring);
            q = io_uring_get_sqe(&ring);
        }
        return q;
    };
    auto arm = [&](int i) {  // user data: the leg; bit 63: a send (its buffer id below)
        io_uring_sqe *q = sqe();
        io_uring_prep_recv_multishot(q, i, nullptr, 0, 0);
        q->flags |= IOSQE_FIXED_FILE | IOSQE_BUFFER_SELECT;
        q->buf_group = 0;
        io_uring_sqe_set_data64(q, (uint64_t)i);
    };
    for (size_t i = 0; i < legs.size(); ++i)
        arm((int)i);
    io_uring_submit(&ring);
    uint64_t moved = 0;
    while (time(nullptr) < end) {
        __kernel_timespec nap{0, nap_us * 1000};
        io_uring_cqe *cqe;
        io_uring_submit_and_wait_timeout(&ring, &cqe, min_wait, nap_us ? &nap : nullptr, nullptr);
        unsigned head, seen = 0;
        int recycled = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            seen++;
            uint64_t data = cqe->user_data;
            if (data >> 63) {  // a send is done with its buffer
                unsigned short id = (unsigned short)(data & 0xffff);
                io_uring_buf_ring_add(br, pool + (size_t)id * size, size, id,
                                      io_uring_buf_ring_mask(count), recycled++);
                if (cqe->res > 0)
                    moved++;
                continue;
            }
            int i = (int)data;
            if (!(cqe->flags & IORING_CQE_F_MORE))
                arm(i);
            if (!(cqe->flags & IORING_CQE_F_BUFFER))
                continue;
            unsigned short id = (unsigned short)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
            unsigned char *p = pool + (size_t)id * size;
            if (cqe->res < 12) {
                io_uring_buf_ring_add(br, p, size, id, io_uring_buf_ring_mask(count), recycled++);
                continue;
            }
            Leg &to = legs[legs[i].peer];
            rewrite(p);
            io_uring_sqe *q = sqe();
            io_uring_prep_send(q, legs[i].peer, p, (size_t)cqe->res, 0);
            io_uring_prep_send_set_addr(q, (sockaddr *)&to.remote, sizeof to.remote);
            q->flags |= IOSQE_FIXED_FILE;
            io_uring_sqe_set_data64(q, (1ull << 63) | id);
        }
        io_uring_cq_advance(&ring, seen);
        if (recycled)
            io_uring_buf_ring_advance(br, recycled);
    }
    return moved;
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 8) {
        fprintf(stderr, "usage: %s epoll|uring N RELAY_BASE GEN_BASE SECONDS [MIN_WAIT NAP_US]\n",
                argv[0]);
        return 2;
    }
    bool uring = strcmp(argv[1], "uring") == 0;
    int n = atoi(argv[2]), relay_base = atoi(argv[3]), gen_base = atoi(argv[4]);
    int seconds = atoi(argv[5]);
    std::vector<Leg> legs(2 * (size_t)n);
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < 2; ++k) {
            Leg &leg = legs[2 * i + k];
            leg.fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
            sockaddr_in local = loopback(relay_base + 2 * i + k);
            if (bind(leg.fd, (sockaddr *)&local, sizeof local) != 0) {
                perror("bind");
                return 1;
            }
            leg.remote = loopback(gen_base + 2 * i + k);
            leg.peer = 2 * i + (1 - k);
        }
    time_t end = time(nullptr) + seconds;
    std::thread idle([end] {
        while (time(nullptr) <= end)
            std::this_thread::sleep_for(std::chrono::milliseconds(200));
    });
    rusage before, after;
    timespec t0, t1;
    getrusage(RUSAGE_THREAD, &before);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t moved = uring ? move_uring(legs, end, argc == 8 ? (unsigned)atoi(argv[6]) : 1,
                                        argc == 8 ? atol(argv[7]) : 0)
                           : move_epoll(legs, end);
    getrusage(RUSAGE_THREAD, &after);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    auto sec = [](const timeval &t) { return (double)t.tv_sec + t.tv_usec / 1e6; };
    double cpu = sec(after.ru_utime) - sec(before.ru_utime) + sec(after.ru_stime) - sec(before.ru_stime);
    double wall = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%s moved=%llu rate=%.0f/s cpu=%.1f%% us_per_datagram=%.2f\n", argv[1],
           (unsigned long long)moved, moved / wall, 100 * cpu / wall, 1e6 * cpu / (double)moved);
    idle.join();
}
