#!/usr/bin/env bash
# Build the pjsua2 Python module from pjproject source with callrouter's router
# configuration (scripts/engine/config_site.h) and guard module, and cache it.
#
# Usage: scripts/build-engine.sh [--install SITE_PACKAGES_DIR] [--print-dir]
#
# Source (see docs/engine.md):
#   default  the pjproject tree inside Debian's `ring` source package, fetched
#            with `apt-get source` (apt verifies it against the signed archive)
#   override CALLROUTER_PJPROJECT_SOURCE=/path/to/pjproject-X.Y.tar.gz or a
#            directory; a tarball must be matched by CALLROUTER_PJPROJECT_SHA256.
# Cache:   ${CALLROUTER_ENGINE_CACHE:-$XDG_CACHE_HOME/callrouter/engine}/<key>/,
#          key = sha256(source id + python + scripts/engine/* + the build steps).
#          A second run with the same key does no work.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
engine_dir="$here/engine"
PYTHON="${PYTHON:-python3}"
# Absolute, because the SWIG step runs make in another directory.
case "$PYTHON" in
  */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;;
  *) PYTHON="$(command -v "$PYTHON")" ;;
esac
cache_root="${CALLROUTER_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/callrouter/engine}"
install_dir=""
print_dir=0
while [ $# -gt 0 ]; do
  case "$1" in
    --install) install_dir="$2"; shift 2 ;;
    --print-dir) print_dir=1; shift ;;
    *) echo "usage: $0 [--install SITE_PACKAGES_DIR] [--print-dir]" >&2; exit 2 ;;
  esac
done

t0=$(date +%s)
step() { printf '[engine %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*" >&2; }
# `$(timed ...)` is not used on purpose: every step prints its own duration.
run_step() {
  local name="$1"; shift
  local s=$(date +%s)
  step "$name ..."
  "$@"
  step "$name done in $(( $(date +%s) - s ))s"
}

source_id() {
  if [ -n "${CALLROUTER_PJPROJECT_SOURCE:-}" ]; then
    if [ -d "$CALLROUTER_PJPROJECT_SOURCE" ]; then
      echo "dir:$(cd "$CALLROUTER_PJPROJECT_SOURCE" && pwd):$(cat "$CALLROUTER_PJPROJECT_SOURCE/version.mak" | sha256sum | cut -c1-16)"
    else
      echo "tarball:${CALLROUTER_PJPROJECT_SHA256:?CALLROUTER_PJPROJECT_SHA256 must name the sha256 of the tarball}"
    fi
  else
    # The candidate version of Debian's ring source package pins the pjproject it embeds.
    local v
    v=$(apt-cache showsrc ring 2>/dev/null | awk '/^Version:/{print $2}' | sort -V | tail -n1)
    [ -n "$v" ] || { echo "no 'ring' source package known to apt (deb-src missing?)" >&2; return 1; }
    echo "debian-ring:$v"
  fi
}

ensure_deb_src() {
  # apt-get source needs deb-src entries; add Debian's own, signed by the archive key.
  if ! apt-cache showsrc ring >/dev/null 2>&1 || [ -z "$(apt-cache showsrc ring 2>/dev/null)" ]; then
    local codename
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    cat > /etc/apt/sources.list.d/callrouter-src.sources <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $codename $codename-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: $codename-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -q >/dev/null
  fi
}

fetch_source() {  # $1 = work dir; prints the pjproject tree path
  local work="$1"
  if [ -n "${CALLROUTER_PJPROJECT_SOURCE:-}" ]; then
    if [ -d "$CALLROUTER_PJPROJECT_SOURCE" ]; then
      cp -a "$CALLROUTER_PJPROJECT_SOURCE" "$work/pjproject"
    else
      echo "${CALLROUTER_PJPROJECT_SHA256}  ${CALLROUTER_PJPROJECT_SOURCE}" | sha256sum -c - >&2
      mkdir -p "$work/pjproject"
      tar -xf "$CALLROUTER_PJPROJECT_SOURCE" -C "$work/pjproject" --strip-components=1
    fi
    echo "$work/pjproject"
    return
  fi
  (cd "$work" && apt-get source -q ring >&2)
  local tree
  tree=$(ls -d "$work"/ring-*/daemon/contrib/tarballs-unpacked/pjproject-*/pjproject-* | head -n1)
  [ -f "$tree/version.mak" ] || { echo "pjproject tree not found in ring source" >&2; return 1; }
  echo "$tree"
}

configure_and_build() {  # $1 = tree
  local tree="$1" p
  for p in "$engine_dir"/patches/*.patch; do
    (cd "$tree" && patch -p1 --forward --quiet < "$p") || { echo "patch failed: $p" >&2; return 1; }
  done
  cp "$engine_dir/config_site.h" "$tree/pjlib/include/pj/config_site.h"
  (cd "$tree" && ./configure CFLAGS="-fPIC -O2" CXXFLAGS="-fPIC -O2" \
      --enable-epoll --disable-video --disable-sound \
      --disable-gsm-codec --disable-speex-codec --disable-speex-aec \
      --disable-ilbc-codec --disable-g7221-codec --disable-l16-codec \
      --disable-opencore-amr --disable-silk --disable-opus --disable-bcg729 \
      --disable-libwebrtc --disable-libyuv --disable-sdl --disable-ffmpeg \
      --disable-v4l2 --disable-openh264 --disable-vpx --disable-android-mediacodec \
      --disable-darwin-ssl --disable-upnp --with-ssl >"$tree/../configure.log" 2>&1) \
    || { tail -n 40 "$tree/../configure.log" >&2; return 1; }
  grep -q 'PJ_IOQUEUE.*epoll\|ac_linux_poll=epoll\|epoll' "$tree/build.mak" "$tree/pjlib/build/os-auto.mak" 2>/dev/null \
    || { echo "configure did not select epoll" >&2; return 1; }
}

make_libs() {
  local tree="$1"
  (cd "$tree" && make dep >"$tree/../make-dep.log" 2>&1 && make -j"$(nproc)" lib >"$tree/../make-lib.log" 2>&1) \
    || { tail -n 40 "$tree/../make-lib.log" >&2; return 1; }
}

build_swig() {
  local tree="$1" swig="$tree/pjsip-apps/src/swig"
  # SWIG reads the header next to pjsua2.i; the compiler includes both next to the wrapper.
  cp "$engine_dir/callrouter_guard.hpp" "$engine_dir/callrouter_guard_impl.hpp" "$swig/"
  cp "$engine_dir/callrouter_guard.hpp" "$engine_dir/callrouter_guard_impl.hpp" "$swig/python/"
  # The guard: compiled into the wrapper, its functions exported to Python.
  cat >> "$swig/pjsua2.i" <<'SWIG'

// callrouter: router policy module (scripts/engine/callrouter_guard.hpp)
%{
#include "callrouter_guard_impl.hpp"
%}
%include "callrouter_guard.hpp"
SWIG
  # -threads: every pjsua2 call releases the GIL (docs/engine.md).
  sed -i 's|^#USE_THREADS = .*|USE_THREADS = -threads -DSWIG_NO_EXPORT_ITERATOR_METHODS|' "$swig/python/Makefile"
  grep -q '^USE_THREADS = -threads' "$swig/python/Makefile" || { echo "could not enable -threads" >&2; return 1; }
  sed -i "s|^  PYTHON_EXE=python3|  PYTHON_EXE=$PYTHON|" "$swig/python/Makefile"
  (cd "$swig/python" && make >"$tree/../swig.log" 2>&1) || { tail -n 40 "$tree/../swig.log" >&2; return 1; }
}

collect() {  # $1 = tree, $2 = dest
  local tree="$1" dest="$2" so
  so=$(find "$tree/pjsip-apps/src/swig/python/build" -name '_pjsua2*.so' | head -n1)
  [ -n "$so" ] || { echo "_pjsua2 module not built" >&2; return 1; }
  mkdir -p "$dest"
  cp "$so" "$tree/pjsip-apps/src/swig/python/pjsua2.py" "$dest/"
  cp "$tree/COPYING" "$dest/PJPROJECT-COPYING"
}

main() {
  local pyver src key dest tree
  pyver=$("$PYTHON" -c 'import sys,sysconfig;print(sys.version.split()[0], sysconfig.get_config_var("EXT_SUFFIX"))')
  command -v apt-get >/dev/null && [ -z "${CALLROUTER_PJPROJECT_SOURCE:-}" ] && ensure_deb_src
  src=$(source_id)
  # The key covers what changes the built module: source, Python, engine files and the
  # build steps themselves (their function bodies), not the install or logging code.
  key=$( { echo "$src"; echo "$pyver"; cat "$engine_dir"/*.h* "$engine_dir"/patches/*
           declare -f fetch_source configure_and_build make_libs build_swig collect; } \
         | sha256sum | cut -c1-16)
  dest="$cache_root/$key"
  if [ -f "$dest/ENGINE-INFO" ]; then
    step "cached engine $key ($src)"
  else
    step "building engine $key from $src for python $pyver"
    work=$(mktemp -d "${TMPDIR:-/tmp}/callrouter-engine.XXXXXX")
    trap 'rm -rf "$work"' EXIT   # global on purpose: the trap runs after main returns
    tree=$(fetch_source "$work")
    step "source: $tree ($(grep -h 'PJ_VERSION_\(MAJOR\|MINOR\|REV\) ' "$tree/version.mak" | awk '{print $4}' | paste -sd.))"
    run_step configure configure_and_build "$tree"
    run_step "make lib" make_libs "$tree"
    run_step "swig module" build_swig "$tree"
    collect "$tree" "$dest.tmp"
    {
      echo "source=$src"
      echo "pjproject_version=$(grep -h 'PJ_VERSION_\(MAJOR\|MINOR\|REV\) ' "$tree/version.mak" | awk '{print $4}' | paste -sd.)"
      echo "pjproject_tree=$(basename "$tree")"
      echo "python=$pyver"
      echo "config_site_sha256=$(sha256sum "$engine_dir/config_site.h" | cut -d' ' -f1)"
      echo "ioqueue=epoll"
      # The compiled limits, as NAME=VALUE lines (read by `callrouter engine-info`).
      awk '$1=="#define" && $2 ~ /^PJ/ {v=$3; for(i=4;i<=NF;i++) v=v" "$i; print $2"="v}' "$engine_dir/config_site.h"
      echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } > "$dest.tmp/ENGINE-INFO"
    rm -rf "$dest"; mv "$dest.tmp" "$dest"
    step "engine cached at $dest"
  fi
  if [ -n "$install_dir" ]; then
    mkdir -p "$install_dir"
    # Copy then rename: a running router keeps the old module's inode mapped.
    local f
    for f in "$dest"/_pjsua2*.so "$dest/pjsua2.py" "$dest/ENGINE-INFO"; do
      local name; name=$(basename "$f")
      [ "$name" = ENGINE-INFO ] && name=pjsua2-ENGINE-INFO
      cp "$f" "$install_dir/.$name.tmp" && mv -f "$install_dir/.$name.tmp" "$install_dir/$name"
    done
    step "installed into $install_dir"
  fi
  [ "$print_dir" = 1 ] && echo "$dest"
  step "done"
}

main
