#!/usr/bin/env bash
# A throw-away PostgreSQL cluster on loopback, for tests and `make cluster`.
#
#   scripts/pg-local.sh start DIR [PORT]   initdb DIR/data (unless it exists), start it on
#                                          127.0.0.1:PORT (when omitted: the port of the
#                                          last start of DIR, else a free one), wait
#                                          until it takes connections and print its
#                                          postgresql:// URL on stdout (nothing else there)
#   scripts/pg-local.sh stop DIR           stop it (fast shutdown); DIR stays for the caller
#
# Debian's `postgresql` package (scripts/install-deps.sh). PostgreSQL refuses to run as
# root, so as root the server runs as the `postgres` user (runuser) and DIR is handed to
# it (so DIR's parent must be open to it: use a fresh directory under /tmp); its unix
# socket is in DIR, not /run/postgresql. Durability is traded for speed
# (fsync off): the cluster is meant to be thrown away. Starting an existing DIR again
# (after stop) keeps its data, which is how tests take the database away and back.
set -euo pipefail

usage() { echo "usage: $0 start DIR [PORT] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$2
port=${3:-}

bindir=""
for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
  [ -x "$candidate/pg_ctl" ] && { bindir=$candidate; break; }
done
[ -n "$bindir" ] || { echo "pg-local: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir" && chmod 0700 "$dir"
    as_pg test -w "$dir" || { echo "pg-local: $dir is not reachable by the postgres user (a parent directory is private?)" >&2; exit 1; }
    if [ -z "$port" ] && [ -f "$dir/port" ]; then
      port=$(cat "$dir/port")  # a restart keeps the URL
    fi
    if [ -z "$port" ]; then
      port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 \
        --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; echo "pg-local: initdb failed" >&2; exit 1; }
    fi
    opts="-h 127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off"
    opts+=" -c full_page_writes=off -c max_connections=200"
    as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -o "$opts" -w -t 60 start \
      >/dev/null || { tail -20 "$dir/server.log" >&2; echo "pg-local: the server did not start" >&2; exit 1; }
    echo "$port" >"$dir/port"
    for _ in $(seq 1 100); do
      as_pg "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" && break
      sleep 0.1
    done
    echo "postgresql://postgres@127.0.0.1:$port/postgres"
    ;;
  stop)
    [ -f "$dir/data/PG_VERSION" ] || { echo "pg-local: no cluster in $dir" >&2; exit 1; }
    if as_pg "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
      as_pg "$bindir/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
    fi
    ;;
  *) usage ;;
esac
