// Shared by gen.cc and relay.cc: a loopback address.
#pragma once
#include <arpa/inet.h>
#include <netinet/in.h>

static inline sockaddr_in loopback(int port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}
