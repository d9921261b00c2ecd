#!/usr/bin/env bash
# Install the Debian packages callrouter needs to build its engine and run its tests,
# only those missing. Idempotent; prints what it installs.
set -euo pipefail

packages=(
  build-essential pkg-config swig libssl-dev uuid-dev dpkg-dev patch   # the engine build
  libsrtp2-dev xz-utils debian-archive-keyring                   # pjproject 2.17 (external SRTP) from sid
  python3 python3-dev python3-venv python3-distutils             # the virtualenv
  sip-tester                                                     # SIPp, for tests and bench
  postgresql                                                     # scripts/pg-local.sh: PostgreSQL store tests
  clang libclang-rt-dev                                          # scripts/fuzz.sh: libFuzzer, ASan, UBSan
  ca-certificates curl
  kamailio                                                       # the SIP balancer: deploy/kamailio, make cluster, tests
  podman runc debootstrap                                        # make image without a Docker daemon (scripts/image.sh)
)

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && { echo "[deps] system packages present"; exit 0; }

echo "[deps] installing: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
