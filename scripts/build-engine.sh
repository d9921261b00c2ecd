#!/usr/bin/env bash
# Build the pjsua2 Python module from pjproject source with callrouter's router
# configuration (scripts/engine/config_site.h) and guard module, and cache it.
#
# Usage: scripts/build-engine.sh [--install SITE_PACKAGES_DIR] [--print-dir] [--source-dir]
#   --source-dir  only print the path of the verified, unpatched pjproject tree
#                 (scripts/fuzz.sh builds its sanitizer libraries from it)
#
# Source (see docs/engine.md):
#   default  pjproject >= 2.15 from Debian sid's `asterisk` source package (its
#            orig-Xpjproject component), version resolved at every build through a
#            private apt configuration under the cache (the system's sources are never
#            touched); apt verifies against the signed archive, the tarball's sha256
#            is checked against the .dsc once more.
#   CALLROUTER_ENGINE_SOURCE=debian-ring  the explicit fallback: pjproject 2.12.1 from
#            Debian stable's `ring` source package. ENGINE-INFO, `callrouter
#            engine-info` and a start-up warning name the upstream fixes it lacks.
#   CALLROUTER_PJPROJECT_SOURCE=/path/to/pjproject-X.Y.tar.gz or a directory (>= 2.15);
#            a tarball must be matched by CALLROUTER_PJPROJECT_SHA256.
# Cache:   ${CALLROUTER_ENGINE_CACHE:-$XDG_CACHE_HOME/callrouter/engine}/
#            src-<key>/   the verified source tree
#            tree-<key>/  that tree patched, configured, libraries built
#            <key>/       the module + ENGINE-INFO; key = sha256(source id + python +
#                         scripts/engine/* + the build steps). A second run does no work.
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
source_dir=0
while [ $# -gt 0 ]; do
  case "$1" in
    --install) install_dir="$2"; shift 2 ;;
    --print-dir) print_dir=1; shift ;;
    --source-dir) source_dir=1; shift ;;
    *) echo "usage: $0 [--install SITE_PACKAGES_DIR] [--print-dir] [--source-dir]" >&2; exit 2 ;;
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

# ---- where the source comes from --------------------------------------------------
# Every Debian lookup goes through a private apt configuration under the cache: the
# system's own sources are never touched. apt checks what it downloads against the
# archive's signed indexes; the pjproject tarball is checked once more against the .dsc.
apt_root="$cache_root/../apt"
engine_source="${CALLROUTER_ENGINE_SOURCE:-debian-sid-asterisk}"
min_version="2.15"
# Security fixes the ring fallback (Jami's pjproject 2.12.1) lacks that a router can reach:
# the SIP/SDP scanner over-read (2.13) and the multipart over-read (2.17). See
# docs/engine-2.12-to-2.17.md.
ring_lacks="CVE-2022-39244 GHSA-x5pq-qrp4-fmrj"

apt_private() {  # $1 = suite set (sid | stable); runs apt-get/apt-cache with it: $2...
  local set="$1"; shift
  local dir="$apt_root/$set"
  "$@" -o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts="$dir/parts" \
       -o Dir::State::Lists="$dir/lists" -o Dir::Cache::archives="$dir/archives" \
       -o APT::Sandbox::User=root
}

apt_private_update() {  # $1 = suite set; (re)reads the signed source indexes
  local set="$1" dir="$apt_root/$1" codename
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  mkdir -p "$dir/parts" "$dir/lists/partial" "$dir/archives/partial"
  if [ "$set" = sid ]; then
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      > "$dir/parts/callrouter-sid-src.sources"
  else
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb-src\nURIs: http://deb.debian.org/debian-security\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$codename" "$codename" "$codename" > "$dir/parts/callrouter-stable-src.sources"
  fi
  apt_private "$set" apt-get -q update >/dev/null 2>"$dir/update.log" \
    || { echo "apt-get update ($set) failed:" >&2; tail -n 5 "$dir/update.log" >&2; return 1; }
}

src_version() {  # $1 = suite set, $2 = source package: the newest version apt knows
  apt_private "$1" apt-cache showsrc "$2" 2>/dev/null | awk '/^Version:/{print $2}' \
    | sort -V | tail -n1
}

source_id() {
  if [ -n "${CALLROUTER_PJPROJECT_SOURCE:-}" ]; then
    if [ -d "$CALLROUTER_PJPROJECT_SOURCE" ]; then
      echo "dir:$(cd "$CALLROUTER_PJPROJECT_SOURCE" && pwd):$(cat "$CALLROUTER_PJPROJECT_SOURCE/version.mak" | sha256sum | cut -c1-16)"
    else
      echo "tarball:${CALLROUTER_PJPROJECT_SHA256:?CALLROUTER_PJPROJECT_SHA256 must name the sha256 of the tarball}"
    fi
    return
  fi
  local v set pkg
  case "$engine_source" in
    debian-sid-asterisk) set=sid; pkg=asterisk ;;
    debian-ring) set=stable; pkg=ring ;;
    *) echo "CALLROUTER_ENGINE_SOURCE must be debian-sid-asterisk (default) or debian-ring (the 2.12.1 fallback), not '$engine_source'" >&2; return 1 ;;
  esac
  # Sid moves: resolve the version now. Offline, fall back to what was resolved last.
  if apt_private_update "$set"; then
    v=$(src_version "$set" "$pkg")
    [ -n "$v" ] && echo "$v" > "$apt_root/$set/$pkg.version"
  fi
  [ -n "${v:-}" ] || v=$(cat "$apt_root/$set/$pkg.version" 2>/dev/null || true)
  [ -n "$v" ] || { echo "no '$pkg' source package known to apt ($set) and none resolved before" >&2; return 1; }
  echo "$engine_source:$v"
}

src_cache_dir() { echo "$cache_root/src-$(echo "$1" | sha256sum | cut -c1-16)"; }

pristine_tree() {  # $1 = source id; prints a verified, unpacked, unpatched pjproject tree
  local src="$1" dir
  dir=$(src_cache_dir "$src")
  if [ ! -f "$dir/SOURCE-INFO" ]; then
    rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
    fetch_source "$src" "$dir.tmp" > "$dir.tmp/TREE"
    rm -rf "$dir"; mv "$dir.tmp" "$dir"
    sed -i "s#$dir.tmp#$dir#" "$dir/TREE" "$dir/SOURCE-INFO"
  fi
  cat "$dir/TREE"
}

fetch_source() {  # $1 = source id, $2 = dir; prints the pjproject tree, writes SOURCE-INFO
  local src="$1" work="$2" tree file sum
  if [ -n "${CALLROUTER_PJPROJECT_SOURCE:-}" ]; then
    if [ -d "$CALLROUTER_PJPROJECT_SOURCE" ]; then
      cp -a "$CALLROUTER_PJPROJECT_SOURCE" "$work/pjproject"
      sum="-"
    else
      echo "${CALLROUTER_PJPROJECT_SHA256}  ${CALLROUTER_PJPROJECT_SOURCE}" | sha256sum -c - >&2
      mkdir -p "$work/pjproject"
      tar -xf "$CALLROUTER_PJPROJECT_SOURCE" -C "$work/pjproject" --strip-components=1
      sum="$CALLROUTER_PJPROJECT_SHA256"
    fi
    tree="$work/pjproject"
    printf 'source_file=%s\nsource_sha256=%s\n' "$CALLROUTER_PJPROJECT_SOURCE" "$sum" > "$work/SOURCE-INFO"
  else
    local version="${src#*:}"
    case "$engine_source" in
      debian-sid-asterisk)
        (cd "$work" && apt_private sid apt-get -q source --download-only "asterisk=$version" >&2)
        file=$(ls "$work"/asterisk_*.orig-Xpjproject.tar.xz | head -n1)
        [ -f "$file" ] || { echo "no pjproject component in asterisk $version" >&2; return 1; }
        sum=$(sha256sum "$file" | cut -d' ' -f1)
        # apt checked the .dsc against the signed Sources index; the .dsc names the tarball's sum.
        grep -q " $sum [0-9]* $(basename "$file")\$" "$work"/asterisk_*.dsc \
          || { echo "$(basename "$file"): sha256 does not match the .dsc" >&2; return 1; }
        mkdir -p "$work/unpacked"
        tar -xf "$file" -C "$work/unpacked"
        tree=$(ls -d "$work"/unpacked/*pjproject* | head -n1)
        ;;
      debian-ring)
        # apt-get source also applies Debian's patches (CVE-2023-27585) with dpkg-source.
        (cd "$work" && apt_private stable apt-get -q source "ring=$version" >&2)
        tree=$(ls -d "$work"/ring-*/daemon/contrib/tarballs-unpacked/pjproject-*/pjproject-* | head -n1)
        file=$(ls "$work"/ring_*.orig.tar.gz | head -n1)
        sum=$(sha256sum "$file" | cut -d' ' -f1)
        ;;
    esac
    rm -f "$work"/*.tar.* "$work"/*.dsc
    printf 'source_package=%s\nsource_version=%s\nsource_file=%s\nsource_sha256=%s\n' \
      "$(basename "$file" | cut -d_ -f1)" "$version" "$(basename "$file")" "$sum" > "$work/SOURCE-INFO"
  fi
  [ -f "$tree/version.mak" ] || { echo "pjproject tree not found in $src" >&2; return 1; }
  echo "upstream_tree=$(basename "$tree")" >> "$work/SOURCE-INFO"
  echo "$tree"
}

tree_version() {  # $1 = tree: "2.17" or "2.12.1"
  grep -h 'PJ_VERSION_\(MAJOR\|MINOR\|REV\) ' "$1/version.mak" | awk '{print $4}' | paste -sd. | sed 's/\.$//'
}

check_version() {  # $1 = version; refuses < 2.15 unless the ring fallback is named
  if [ "$(printf '%s\n%s\n' "$min_version" "$1" | sort -V | head -n1)" != "$min_version" ]; then
    [ "$engine_source" = debian-ring ] && [ -z "${CALLROUTER_PJPROJECT_SOURCE:-}" ] && return 0
    echo "pjproject $1 is older than $min_version: refused. Only the Debian ring 2.12.1 source may be used as a fallback (CALLROUTER_ENGINE_SOURCE=debian-ring); see docs/engine.md" >&2
    return 1
  fi
}

# ---- how it is built ----------------------------------------------------------------
patch_and_configure() {  # $1 = tree (a private copy of the pristine one)
  local tree="$1" p
  # -l: the 2.12.1 tree is tab-indented, 2.17 space-indented; the same patches fit both.
  # A patch whose first line is "# callrouter: pjproject >= X" is applied to X and later
  # only (0006 adds to 2.17's ioqueue what the relay needs; the 2.12.1 fallback has none).
  local v min; v=$(tree_version "$tree")
  for p in "$engine_dir"/patches/*.patch; do
    min=$(sed -n '1s/^# callrouter: pjproject >= \([0-9.]*\)$/\1/p' "$p")
    if [ -n "$min" ] && [ "$(printf '%s\n%s\n' "$min" "$v" | sort -V | head -n1)" != "$min" ]; then
      echo "patch $(basename "$p") is for pjproject >= $min: not applied to $v" >&2
      continue
    fi
    (cd "$tree" && patch -p1 -l --forward --quiet < "$p") || { echo "patch failed: $p" >&2; return 1; }
  done
  # Debian's +dfsg repack of 2.17 drops the Windows-only BDIMAD device; the makefile
  # still lists it. An empty unit is what upstream compiles on Linux anyway (#if guarded).
  local bdimad="$tree/pjmedia/src/pjmedia-audiodev/bdimad_dev.c"
  [ -f "$bdimad" ] || echo '/* callrouter: stripped by Debian (Windows only) */' > "$bdimad"
  cp "$engine_dir/config_site.h" "$tree/pjlib/include/pj/config_site.h"
  # -DNDEBUG: a failed pj_assert must not abort the router (docs/engine.md, "Assertions").
  (cd "$tree" && ./configure CFLAGS="-fPIC -O2 -DNDEBUG" CXXFLAGS="-fPIC -O2 -DNDEBUG" \
      --enable-epoll --disable-video --disable-sound --disable-resample \
      --with-external-srtp \
      --disable-gsm-codec --disable-speex-codec --disable-speex-aec \
      --disable-ilbc-codec --disable-g7221-codec --disable-l16-codec \
      --disable-opencore-amr --disable-silk --disable-opus --disable-bcg729 \
      --disable-libwebrtc --disable-libwebrtc-aec3 --disable-libyuv --disable-sdl --disable-ffmpeg \
      --disable-v4l2 --disable-openh264 --disable-vpx --disable-android-mediacodec \
      --disable-darwin-ssl --disable-upnp --with-ssl >"$tree/../configure.log" 2>&1) \
    || { tail -n 40 "$tree/../configure.log" >&2; return 1; }
  grep -q 'epoll' "$tree/build.mak" "$tree/pjlib/build/os-auto.mak" 2>/dev/null \
    || { echo "configure did not select epoll" >&2; return 1; }
}

make_libs() {
  local tree="$1"
  (cd "$tree" && make dep >"$tree/../make-dep.log" 2>&1 && make -j"$(nproc)" lib >"$tree/../make-lib.log" 2>&1) \
    || { tail -n 40 "$tree/../make-lib.log" >&2; return 1; }
}

build_swig() {  # $1 = built tree; builds into a fresh copy of the SWIG directory
  local tree="$1" swig="$tree/pjsip-apps/src/swig"
  rm -rf "$swig"; cp -a "$swig.pristine" "$swig"
  # SWIG reads the header next to pjsua2.i; the compiler includes both next to the wrapper.
  cp "$engine_dir"/callrouter_*.hpp "$swig/"
  cp "$engine_dir"/callrouter_*.hpp "$swig/python/"
  # The guard and the media relay: compiled into the wrapper, their functions exported
  # to Python.
  cat >> "$swig/pjsua2.i" <<'SWIG'

// callrouter: router policy module (scripts/engine/callrouter_guard.hpp) and the
// packet relay between bridged legs (scripts/engine/callrouter_relay.hpp)
%{
#include "callrouter_guard_impl.hpp"
#include "callrouter_relay_impl.hpp"
%}
%include "callrouter_guard.hpp"
%include "callrouter_relay.hpp"
SWIG
  # -threads: every pjsua2 call releases the GIL (docs/engine.md).
  sed -i 's|^#\?USE_THREADS = .*|USE_THREADS = -threads -DSWIG_NO_EXPORT_ITERATOR_METHODS|' "$swig/python/Makefile"
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

engine_info() {  # $1 = tree, $2 = source id, $3 = source info file
  local tree="$1" src="$2" version
  version=$(tree_version "$tree")
  echo "source=${src%%:*}"
  cat "$3"
  echo "pjproject_version=$version"
  echo "python=$pyver"
  echo "config_site_sha256=$(sha256sum "$engine_dir/config_site.h" | cut -d' ' -f1)"
  echo "patches=$(cd "$engine_dir/patches" && ls *.patch | paste -sd' ')"
  echo "ioqueue=epoll"
  echo "assertions=log-and-continue (NDEBUG)"
  if [ "$(printf '%s\n%s\n' "$min_version" "$version" | sort -V | head -n1)" != "$min_version" ]; then
    echo "fallback=older than $min_version, built on explicit request"
    echo "lacks_upstream_fixes=$ring_lacks"
  fi
  # The compiled limits, as NAME=VALUE lines (read by `callrouter engine-info`).
  awk '$1=="#define" && $2 ~ /^PJ/ {v=$3; for(i=4;i<=NF;i++) v=v" "$i; print $2"="v}' "$engine_dir/config_site.h"
  echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}

built_tree() {  # $1 = source id; prints a patched, configured tree with its libraries built
  local src="$1" pristine key dir
  pristine=$(pristine_tree "$src")
  # The libraries depend on the source, config_site.h, the patches and these steps; the
  # guard only on the SWIG step. Keeping the built tree makes a guard change cost ~2 min.
  key=$( { echo "$src"; cat "$engine_dir/config_site.h" "$engine_dir"/patches/*
           declare -f patch_and_configure make_libs; } | sha256sum | cut -c1-16)
  dir="$cache_root/tree-$key"
  if [ ! -f "$dir/BUILT" ]; then
    rm -rf "$dir"; mkdir -p "$dir"
    cp -a "$pristine" "$dir/pjproject"
    check_version "$(tree_version "$dir/pjproject")" || { rm -rf "$dir"; return 1; }
    run_step configure patch_and_configure "$dir/pjproject"
    run_step "make lib" make_libs "$dir/pjproject"
    cp -a "$dir/pjproject/pjsip-apps/src/swig" "$dir/pjproject/pjsip-apps/src/swig.pristine"
    touch "$dir/BUILT"
  fi
  echo "$dir/pjproject"
}

main() {
  local src key dest tree
  pyver=$("$PYTHON" -c 'import sys,sysconfig;print(sys.version.split()[0], sysconfig.get_config_var("EXT_SUFFIX"))')
  src=$(source_id)
  if [ "$source_dir" = 1 ]; then pristine_tree "$src"; return; fi
  # The key covers what changes the built module: source, Python, engine files and the
  # build steps themselves (their function bodies), not the install or logging code.
  key=$( { echo "$src"; echo "$pyver"; cat "$engine_dir"/*.h* "$engine_dir"/patches/*
           declare -f fetch_source patch_and_configure make_libs build_swig collect engine_info; } \
         | sha256sum | cut -c1-16)
  dest="$cache_root/$key"
  if [ -f "$dest/ENGINE-INFO" ]; then
    step "cached engine $key ($src)"
  else
    step "building engine $key from $src for python $pyver"
    tree=$(built_tree "$src")
    step "source: $tree ($(tree_version "$tree"))"
    run_step "swig module" build_swig "$tree"
    rm -rf "$dest.tmp"
    collect "$tree" "$dest.tmp"
    engine_info "$tree" "$src" "$(src_cache_dir "$src")/SOURCE-INFO" > "$dest.tmp/ENGINE-INFO"
    rm -rf "$dest"; mv "$dest.tmp" "$dest"
    step "engine cached at $dest"
  fi
  if grep -q '^fallback=' "$dest/ENGINE-INFO"; then
    step "WARNING: $(grep '^pjproject_version=' "$dest/ENGINE-INFO") is a fallback; it lacks: $ring_lacks"
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
    # Its bytecode too: pjsua2.py is 14,000 generated lines, and a process that compiles it
    # at import (no __pycache__: a read-only site-packages in the image, or
    # PYTHONDONTWRITEBYTECODE) keeps about 8 MiB more resident for good (docs/benchmarks.md,
    # "Idle footprint"). py_compile writes the .pyc atomically.
    "$PYTHON" -m py_compile "$install_dir/pjsua2.py"
    step "installed into $install_dir"
  fi
  [ "$print_dir" = 1 ] && echo "$dest"
  step "done"
}

main
