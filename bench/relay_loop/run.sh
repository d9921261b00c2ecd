#!/bin/sh
# Alternates the two loops against the same load: ./run.sh [PAIRS] [ROUNDS] [SECONDS]
# Loopback only (ports 40000+ and 50000+); each run stops by itself.
set -e
cd "$(dirname "$0")"
pairs=${1:-500}; rounds=${2:-5}; seconds=${3:-8}
if [ ! -e /usr/include/liburing.h ]; then
    echo "needs liburing (Debian: apt-get install liburing-dev)" >&2
    exit 1
fi
out=${TMPDIR:-/tmp}/relay-loop; mkdir -p "$out"
g++ -O2 -o "$out/gen" gen.cc -lpthread
g++ -O2 -o "$out/relay" relay.cc -luring -lpthread
for round in $(seq "$rounds"); do
    for mode in epoll uring; do
        "$out/relay" "$mode" "$pairs" 40000 50000 "$seconds" > "$out/result" &
        relay=$!
        sleep 0.3
        "$out/gen" "$pairs" 40000 50000 "$((seconds + 1))"
        wait "$relay"
        cat "$out/result"
    done
done
