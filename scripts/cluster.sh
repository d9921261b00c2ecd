#!/usr/bin/env bash
# `make cluster`: a local cluster on loopback, the topology of docs/scaling.md on one box:
# a throw-away PostgreSQL (scripts/pg-local.sh), two routers sharing it, Kamailio in front
# (deploy/kamailio/kamailio.cfg). Provisions nothing; prints the SIP entry address, both API
# URLs and an API key; Ctrl-C (or SIGTERM) stops everything it started, by pid, and removes
# the temporary directory (CALLROUTER_CLUSTER_KEEP=1 keeps it, with every log).
#
# Ports (environment): CALLROUTER_CLUSTER_SIP (Kamailio, default 5060), routers' SIP 5071 and
# 5072, HTTP 8081 and 8082, RTP 20000-24999 and 25000-29999 (CALLROUTER_CLUSTER_BASE shifts
# the routers' SIP and HTTP ports: base+71/+72 and base+3081/+3082, default 5000).
set -euo pipefail
# Job control: every child gets its own process group, so Ctrl-C reaches this script alone
# and each router gets exactly one SIGTERM from stop_all (a second signal skips its drain).
set -m

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PY="${PY:-$root/.venv/bin/python}"
host=127.0.0.1
sip_entry="${CALLROUTER_CLUSTER_SIP:-5060}"
base="${CALLROUTER_CLUSTER_BASE:-5000}"
command -v kamailio >/dev/null || { echo "cluster: kamailio is not installed (make deps)" >&2; exit 1; }

dir="$(mktemp -d /tmp/callrouter-cluster.XXXXXX)"
chmod 0755 "$dir"  # PostgreSQL runs as its own user below it
pids=()
pg_started=0

stop_all() {
  local rc=$?
  trap - INT TERM EXIT
  echo >&2
  echo "[cluster] stopping" >&2
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done  # routers drain
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ "$pg_started" = 1 ] && bash "$here/pg-local.sh" stop "$dir/pg" || true
  if [ "${CALLROUTER_CLUSTER_KEEP:-0}" = 1 ]; then
    echo "[cluster] logs kept in $dir" >&2
  else
    rm -rf "$dir"
  fi
  exit "$rc"
}
trap stop_all INT TERM EXIT

echo "[cluster] PostgreSQL ..." >&2
db_url="$(bash "$here/pg-local.sh" start "$dir/pg")"
pg_started=1

start_router() {  # $1 = name, $2 = SIP port, $3 = HTTP port, $4 = RTP range
  mkdir -p "$dir/$1"
  CALLROUTER_DATABASE_URL="$db_url" \
  CALLROUTER_DATA_DIR="$dir/$1" \
  CALLROUTER_NODE_NAME="$1" \
  CALLROUTER_SECRETS_KEY_FILE="$dir/secrets.key" \
  CALLROUTER_SIP_LISTEN="$host:$2" \
  CALLROUTER_SIP_ADVERTISE="$host" \
  CALLROUTER_HTTP_LISTEN="$host:$3" \
  CALLROUTER_RTP_PORTS="$4" \
  CALLROUTER_LOG_FORMAT=json \
  CALLROUTER_SIP_INBOUND_FLOOD_LIMIT=0 \
    "$PY" -m callrouter serve >"$dir/$1/router.log" 2>&1 &
  pids+=($!)
  local i
  for i in $(seq 1 300); do
    if curl -fsS "http://$host:$3/api/v1/health" >/dev/null 2>&1; then return 0; fi
    kill -0 "${pids[-1]}" 2>/dev/null || { tail -n 20 "$dir/$1/router.log" >&2; echo "[cluster] $1 exited" >&2; exit 1; }
    sleep 0.1
  done
  tail -n 20 "$dir/$1/router.log" >&2
  echo "[cluster] $1 did not become healthy" >&2
  exit 1
}

echo "[cluster] router-a, router-b ..." >&2
start_router router-a $((base + 71)) $((base + 3081)) 20000-24999
# The first router on a fresh database makes the first API key and prints it once.
key="$(grep -ho 'CALLROUTER_API_KEY=[^ ]*' "$dir/router-a/router.log" | head -n1 | cut -d= -f2)"
start_router router-b $((base + 72)) $((base + 3082)) 25000-29999

printf '1 sip:%s:%s 0 0\n1 sip:%s:%s 0 0\n' "$host" $((base + 71)) "$host" $((base + 72)) \
  > "$dir/dispatcher.list"
printf '1 127.0.0.0 8 0 loopback\n' > "$dir/allowed-sources.list"
echo "[cluster] Kamailio ..." >&2
kamailio -DD -E -f "$root/deploy/kamailio/kamailio.cfg" -m 64 -M 8 -Y "$dir" \
  -A "LISTEN=udp:$host:$sip_entry" -A "DISPATCHER_LIST=\"$dir/dispatcher.list\"" \
  -A "ALLOWED_SOURCES=\"$dir/allowed-sources.list\"" -A PING_INTERVAL=2 \
  >"$dir/kamailio.log" 2>&1 &
pids+=($!)
sleep 1
kill -0 "${pids[-1]}" 2>/dev/null || { tail -n 20 "$dir/kamailio.log" >&2; echo "[cluster] kamailio exited" >&2; exit 1; }

cat <<EOF

callrouter cluster on loopback (Ctrl-C stops it)

  SIP entry (Kamailio)   sip:$host:$sip_entry  (UDP; providers call here)
  router-a API           http://$host:$((base + 3081))   SIP $host:$((base + 71))
  router-b API           http://$host:$((base + 3082))   SIP $host:$((base + 72))
  PostgreSQL             $db_url
  logs                   $dir

  export CALLROUTER_API_URL=http://$host:$((base + 3081))
  export CALLROUTER_API_KEY=${key:-<none printed: the database already had keys>}

EOF
wait -n "${pids[@]}" || true
echo "[cluster] a process exited; stopping the rest" >&2
