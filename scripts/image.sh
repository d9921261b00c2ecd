#!/usr/bin/env bash
# Build or run the callrouter container image (`make image`, tests/integration/test_image.py).
#
# Usage: scripts/image.sh build [TAG]     build the Dockerfile into TAG (default callrouter:local)
#        scripts/image.sh run ARGS...     `<engine> run ARGS...` with this machine's adjustments
#        scripts/image.sh engine          print the container engine that would be used
#        scripts/image.sh inputs-hash     sha256 over the Dockerfile and the engine build (below)
#
# Docker is used where its daemon answers. Without it, podman as in ../shared/containers.md: runc instead
# of crun, no default ulimits, a base image made with debootstrap from Debian's own mirror when
# `debian:bookworm-slim` cannot be pulled, and the host's CA bundle mounted for the build only
# (an intercepting proxy). None of this goes into the Dockerfile: real builds do not need it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cmd="${1:-}"; shift || true
base="debian:bookworm-slim"
conf_dir="${CALLROUTER_IMAGE_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/callrouter/image}"

engine() {
  if [ -n "${CALLROUTER_CONTAINER_ENGINE:-}" ]; then echo "$CALLROUTER_CONTAINER_ENGINE"
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker
  elif command -v podman >/dev/null 2>&1; then echo podman
  else echo "scripts/image.sh: neither docker nor podman is installed (make deps installs podman)" >&2; return 1
  fi
}

# The engine command with this machine's adjustments (podman: runc, no default ulimits),
# in the array `argv`.
engine_argv() {
  local e; e="$(engine)"
  argv=("$e")
  if [ "$e" = podman ]; then
    mkdir -p "$conf_dir"
    printf '[containers]\ndefault_ulimits = []\n' > "$conf_dir/containers.conf"
    export CONTAINERS_CONF="$conf_dir/containers.conf"
    [ -x /usr/sbin/runc ] && argv+=(--runtime /usr/sbin/runc)
  fi
  return 0
}

engine_cmd() { engine_argv; "${argv[@]}" "$@"; }

# What the image's build depends on beyond the Python code: the Dockerfile and the engine
# build (its script, the guard and patches), the dependencies and the baked-in config. A
# change here means the image test must run again (tests/integration/test_image.py).
inputs_hash() {
  cd "$root"
  find Dockerfile .dockerignore scripts/build-engine.sh scripts/engine pyproject.toml \
       config/callrouter.toml -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum \
    | sha256sum | cut -d' ' -f1
}

ensure_base() {
  engine_cmd image exists "$base" 2>/dev/null && return 0
  [ "$(engine)" = docker ] && return 0            # docker pulls it itself
  if engine_cmd pull -q "$base" >/dev/null 2>&1; then return 0; fi
  echo "[image] $base cannot be pulled: making it with debootstrap from Debian's mirror" >&2
  command -v debootstrap >/dev/null || { echo "[image] debootstrap missing (make deps)" >&2; return 1; }
  local mirror
  mirror="$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
            | grep -v security | head -n1)"
  mirror="${mirror:-http://deb.debian.org/debian}"
  local rootfs; rootfs="$(mktemp -d)"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >&2
  tar -C "$rootfs" -c . | engine_cmd import - "$base" >&2
  rm -rf "$rootfs"
}

case "$cmd" in
  engine) engine ;;
  inputs-hash) inputs_hash ;;
  build)
    tag="${1:-${CALLROUTER_IMAGE:-callrouter:local}}"
    ensure_base
    extra=()
    # podman writes OCI images by default, which drop the Dockerfile's HEALTHCHECK.
    [ "$(engine)" = podman ] && extra=(--format docker)
    if [ "$(engine)" = podman ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
      extra+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro
             --env PIP_CERT=/run/host-ca.crt --env SSL_CERT_FILE=/run/host-ca.crt)
    fi
    if [ "$(engine)" = podman ] && command -v apt-config >/dev/null; then
      # The host's apt network settings (a mirror snapshot whose sid Release has expired,
      # a proxy) for the build's apt runs, the engine's private sid lookup included.
      mkdir -p "$conf_dir"
      apt-config dump | grep -iE '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy) ' \
        > "$conf_dir/apt-host.conf" || true
      [ -s "$conf_dir/apt-host.conf" ] \
        && extra+=(-v "$conf_dir/apt-host.conf:/etc/apt/apt.conf.d/99host-build.conf:ro")
    fi
    echo "[image] building $tag with $(engine)" >&2
    t0=$(date +%s)
    engine_cmd build --network host "${extra[@]}" -t "$tag" "$root"
    echo "[image] $tag built in $(( $(date +%s) - t0 ))s" >&2
    ;;
  # exec: signals sent to this process reach the engine, which passes them to the container.
  run) engine_argv; exec "${argv[@]}" run "$@" ;;
  exec) engine_argv; exec "${argv[@]}" "$@" ;;
  *) echo "usage: $0 build [TAG] | run ARGS... | exec ARGS... | engine | inputs-hash" >&2; exit 2 ;;
esac
