#!/usr/bin/env bash
# Fuzz the code that reads raw SIP from the wire: libFuzzer + AddressSanitizer +
# UndefinedBehaviorSanitizer, built with Debian's clang.
#
#   fuzz_guard_text  the guard's text functions (scripts/engine/callrouter_guard_text.hpp),
#                    harness tests/fuzz/fuzz_guard_text.cpp
#   fuzz-sip         pjproject's own SIP message parser harness (tests/fuzz/fuzz-sip.c of
#                    the pjproject tree), linked against pjproject libraries built with the
#                    sanitizers, callrouter's config_site.h and engine patches applied
#
# Usage: scripts/fuzz.sh [SECONDS] [--merge] [--only HARNESS]
#   SECONDS   fuzzing time per harness (else CALLROUTER_FUZZ_SECONDS, else 60)
#   --merge   add the new inputs that widen coverage to tests/fuzz/corpus/<harness>/
#             (without it they stay in a temporary directory and are deleted)
#   --only    run one harness
#
# Each harness first runs every file in tests/fuzz/regressions/<harness>/ once (inputs
# that crashed before), then fuzzes from tests/fuzz/corpus/<harness>/. A crash exits
# non-zero and prints the input's path: keep it as tests/fuzz/regressions/<harness>/<name>.
#
# pjproject tree: CALLROUTER_FUZZ_PJ_TREE, else `scripts/build-engine.sh --source-dir`
# (a verified, pristine tree). It is never modified: it is copied before configure.
# Cache: ${CALLROUTER_ENGINE_CACHE:-~/.cache/callrouter/engine}/../fuzz/
#   libs-<key>/  sanitizer pjproject libraries; key = the tree's content + clang version +
#                config_site.h + engine patches + this script's build steps
#   bin-<key>/   harness binaries; key = libs key + harness sources + the guard text header
# A second run builds nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
engine_dir="$here/engine"
fuzz_dir="$repo/tests/fuzz"
engine_cache="${CALLROUTER_ENGINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/callrouter/engine}"
mkdir -p "$engine_cache/../fuzz"
cache_root="$(cd "$engine_cache/../fuzz" && pwd)"
jobs="${CALLROUTER_FUZZ_JOBS:-$(nproc)}"
harnesses=(fuzz_guard_text fuzz-sip)

seconds="${CALLROUTER_FUZZ_SECONDS:-60}"
merge=0
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --merge) merge=1; shift ;;
    --only) only="$2"; shift 2 ;;
    [0-9]*) seconds="$1"; shift ;;
    *) echo "usage: $0 [SECONDS] [--merge] [--only fuzz_guard_text|fuzz-sip]" >&2; exit 2 ;;
  esac
done
# libFuzzer reads -max_total_time=0 as "no limit": at least one second.
case "$seconds" in ''|*[!0-9]*|0|0*) echo "SECONDS must be a whole number >= 1, not '$seconds'" >&2; exit 2 ;; esac
if [ -n "$only" ]; then
  case " ${harnesses[*]} " in *" $only "*) harnesses=("$only") ;;
    *) echo "unknown harness '$only' (${harnesses[*]})" >&2; exit 2 ;; esac
fi

t0=$(date +%s)
step() { printf '[fuzz %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*" >&2; }
run_step() {
  local name="$1"; shift
  local s=$(date +%s)
  step "$name ..."
  "$@"
  step "$name done in $(( $(date +%s) - s ))s"
}

# ---- toolchain ---------------------------------------------------------------------
clang_works() {  # clang that links a libFuzzer + ASan + UBSan program
  command -v clang >/dev/null && command -v clang++ >/dev/null || return 1
  local probe
  probe=$(mktemp -d "${TMPDIR:-/tmp}/callrouter-fuzz-probe.XXXXXX")
  printf '#include <cstddef>\n#include <cstdint>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t *, size_t) { return 0; }\n' \
    > "$probe/p.cpp"
  clang++ -fsanitize=fuzzer,address,undefined "$probe/p.cpp" -o "$probe/p" >/dev/null 2>&1
  local rc=$?
  rm -rf "$probe"
  return $rc
}

ensure_clang() {
  clang_works && return 0
  command -v apt-get >/dev/null || { echo "clang with libFuzzer is missing and apt-get is not available" >&2; return 1; }
  # clang + its sanitizer/libFuzzer runtime (Debian: libclang-rt-dev); only what is missing.
  local pkg missing=()
  for pkg in clang libclang-rt-dev; do
    [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    step "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
      || { DEBIAN_FRONTEND=noninteractive $sudo apt-get update -q >&2 \
           && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
  fi
  clang_works || { echo "clang cannot build a libFuzzer + ASan + UBSan program" >&2; return 1; }
}

# ---- the pjproject tree ------------------------------------------------------------
pj_tree() {
  local tree
  if [ -n "${CALLROUTER_FUZZ_PJ_TREE:-}" ]; then
    tree="$CALLROUTER_FUZZ_PJ_TREE"
  else
    tree=$(bash "$here/build-engine.sh" --source-dir | tail -n1)
  fi
  [ -f "$tree/version.mak" ] && [ -f "$tree/pjsip/src/pjsip/sip_parser.c" ] && [ -f "$tree/tests/fuzz/fuzz-sip.c" ] \
    || { echo "not a pjproject tree with tests/fuzz/fuzz-sip.c: '$tree'" >&2; return 1; }
  (cd "$tree" && pwd)
}

tree_sum() {  # content of every file in the tree, names included
  (cd "$1" && find . -type f ! -path './.git/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) \
    | sha256sum | cut -c1-16
}

pj_version() {
  grep -h 'PJ_VERSION_\(MAJOR\|MINOR\|REV\) ' "$1/version.mak" | awk '{print $4}' | paste -sd. | sed 's/\.*$//'
}

# ---- build steps (their bodies are part of the cache keys) ---------------------------
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fsanitize-address-use-after-scope"
# PJ_DEBUG=1: every pj_assert/PJ_ASSERT_RETURN aborts, so fuzzing finds the assertions the
# engine only logs (config_site.h sets PJ_DEBUG 0 unless it is defined; docs/engine.md).
LIB_CFLAGS="-O1 -gline-tables-only -fno-omit-frame-pointer -DPJ_DEBUG=1 -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION $SAN_FLAGS -fsanitize=fuzzer-no-link"

build_libs() {  # $1 = pristine tree, $2 = work dir; leaves the built tree in $2/pj
  local src="$1" work="$2" tree="$2/pj" p
  cp -a "$src" "$tree"
  rm -rf "$tree/.git"
  for p in "$engine_dir"/patches/*.patch; do
    [ -f "$p" ] || continue
    (cd "$tree" && patch -p1 --forward --quiet < "$p") || { echo "patch failed: $p" >&2; return 1; }
  done
  cp "$engine_dir/config_site.h" "$tree/pjlib/include/pj/config_site.h"
  (cd "$tree" && ./configure CC=clang CXX=clang++ CFLAGS="$LIB_CFLAGS" CXXFLAGS="$LIB_CFLAGS" \
      LDFLAGS="$SAN_FLAGS" --enable-epoll --disable-ssl --disable-video --disable-sound \
      --disable-resample --disable-libsrtp --disable-gsm-codec --disable-speex-codec \
      --disable-speex-aec --disable-ilbc-codec --disable-g7221-codec --disable-l16-codec \
      --disable-opencore-amr --disable-silk --disable-opus --disable-bcg729 \
      --disable-libwebrtc --disable-libyuv --disable-sdl --disable-ffmpeg --disable-v4l2 \
      --disable-openh264 --disable-vpx --disable-android-mediacodec --disable-darwin-ssl \
      --disable-upnp >"$work/configure.log" 2>&1) \
    || { tail -n 40 "$work/configure.log" >&2; return 1; }
  # The parser harness needs pjlib, pjlib-util, pjsip and pjsip-ua (dialogs) only.
  mkdir -p "$tree"/{pjlib,pjlib-util,pjsip}/lib
  (cd "$tree" && make -C pjlib/build -j"$jobs" lib && make -C pjlib-util/build -j"$jobs" lib \
      && make -C pjsip/build -j"$jobs" pjsip pjsip-ua) >"$work/make.log" 2>&1 \
    || { tail -n 40 "$work/make.log" >&2; return 1; }
}

collect_libs() {  # $1 = built tree, $2 = dest: the static libraries and every header
  local tree="$1" dest="$2" d
  mkdir -p "$dest/lib" "$dest/include"
  cp "$tree"/pjlib/lib/*.a "$tree"/pjlib-util/lib/*.a "$tree"/pjsip/lib/*.a "$dest/lib/"
  for d in pjlib pjlib-util pjnath pjmedia pjsip; do cp -a "$tree/$d/include/." "$dest/include/"; done
  cp "$tree/tests/fuzz/fuzz-sip.c" "$dest/"
  # The compile flags the tree's own fuzz Makefile would use (PJ_CFLAGS), and the
  # system libraries it links (configure's LIBS).
  printf 'include %s/build.mak\nprint:\n\t@echo $(PJ_CFLAGS)\n' "$tree" > "$tree/print.mak"
  make -s -f "$tree/print.mak" print | tr ' ' '\n' | grep -E '^-D' | tr '\n' ' ' > "$dest/CFLAGS"
  sed -n 's/^LIBS=.\(.*\).$/\1/p' "$tree/config.log" | head -n1 > "$dest/LIBS"
}

build_harnesses() {  # $1 = libs dir, $2 = dest
  local libs="$1" dest="$2" defs pjlibs syslibs target lib
  mkdir -p "$dest"
  clang++ -std=c++17 -O1 -g -fno-omit-frame-pointer -Wall -Wextra \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I"$engine_dir" "$fuzz_dir/fuzz_guard_text.cpp" -o "$dest/fuzz_guard_text"
  defs=$(cat "$libs/CFLAGS")
  syslibs=$(cat "$libs/LIBS")
  # Static libraries in link order (users first), named lib<name>-<target>.a.
  target=$(cd "$libs/lib" && ls libpj-*.a | head -n1 | sed 's/^libpj-//; s/\.a$//')
  pjlibs=""
  for lib in pjsip-ua pjsip pjlib-util pj; do pjlibs="$pjlibs $libs/lib/lib$lib-$target.a"; done
  # shellcheck disable=SC2086
  clang $defs -I"$libs/include" -O1 -gline-tables-only -fno-omit-frame-pointer \
    -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION $SAN_FLAGS -fsanitize=fuzzer \
    -c "$libs/fuzz-sip.c" -o "$dest/fuzz-sip.o"
  # shellcheck disable=SC2086
  clang++ $SAN_FLAGS -fsanitize=fuzzer "$dest/fuzz-sip.o" $pjlibs $syslibs -o "$dest/fuzz-sip"
  rm -f "$dest/fuzz-sip.o"
}

# ---- running --------------------------------------------------------------------------
max_len() { case "$1" in fuzz-sip) echo 5120 ;; *) echo 8192 ;; esac; }

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:check_initialization_order=1:strict_string_checks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

run_regressions() {  # $1 = harness, $2 = binary, $3 = log; 0 = all pass
  local name="$1" bin="$2" log="$3" files=() f
  for f in "$fuzz_dir/regressions/$name"/*; do
    [ -f "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || { step "$name: no regression inputs"; return 0; }
  if "$bin" -timeout=25 -rss_limit_mb=2048 "${files[@]}" >"$log" 2>&1; then
    step "$name: ${#files[@]} regression input(s) pass"
    return 0
  fi
  tail -n 60 "$log" >&2
  local bad
  bad=$(grep -a '^Running: ' "$log" | tail -n1 | sed 's/^Running: //')
  echo "CRASH: $name regression input $bad (log: $log)" >&2
  return 1
}

run_fuzz() {  # $1 = harness, $2 = binary, $3 = run dir; 0 = no crash
  local name="$1" bin="$2" rc=0
  local out="$3/$name"
  mkdir -p "$out/new" "$out/artifacts"
  run_regressions "$name" "$bin" "$out/regressions.log" || return 1
  "$bin" -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 -max_len="$(max_len "$name")" \
    -print_final_stats=1 -artifact_prefix="$out/artifacts/" \
    "$out/new" "$fuzz_dir/corpus/$name" >"$out/fuzz.log" 2>&1 || rc=$?
  local runs eps new rss took
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/fuzz.log" | tail -n1)
  eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out/fuzz.log" | tail -n1)
  new=$(find "$out/new" -type f | wc -l)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$out/fuzz.log" | tail -n1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$out/fuzz.log" | tail -n1)
  if [ "$rc" -eq 0 ]; then
    step "$name: ${runs:-?} runs in ${took:-?}s, ${eps:-?} exec/s, $new new input(s), peak RSS ${rss:-?} MB, corpus $(find "$fuzz_dir/corpus/$name" -type f | wc -l) file(s)"
  else
    step "$name: crashed (exit $rc) after ${runs:-?} runs"
  fi
  if [ "$rc" -ne 0 ]; then
    grep -a -A40 '^==[0-9]*==ERROR\|runtime error\|invariant broken\|^==[0-9]*== ERROR' "$out/fuzz.log" | head -n 80 >&2 || tail -n 60 "$out/fuzz.log" >&2
    local a
    for a in "$out"/artifacts/*; do
      [ -f "$a" ] && echo "CRASH: $name input $a (log: $out/fuzz.log); keep it as tests/fuzz/regressions/$name/<name>" >&2
    done
    [ -n "$(ls -A "$out/artifacts")" ] || echo "CRASH: $name exited $rc without an artifact (log: $out/fuzz.log)" >&2
    return 1
  fi
  if [ "$merge" = 1 ] && [ "$new" -gt 0 ]; then
    local before after
    before=$(find "$fuzz_dir/corpus/$name" -type f | wc -l)
    "$bin" -merge=1 -max_len="$(max_len "$name")" "$fuzz_dir/corpus/$name" "$out/new" >"$out/merge.log" 2>&1 \
      || { tail -n 20 "$out/merge.log" >&2; return 1; }
    after=$(find "$fuzz_dir/corpus/$name" -type f | wc -l)
    step "$name: merged $(( after - before )) input(s) into tests/fuzz/corpus/$name"
    local bytes
    bytes=$(du -sb "$fuzz_dir/corpus" | cut -f1)
    [ "$bytes" -le 1000000 ] || step "WARNING: tests/fuzz/corpus is $bytes bytes; keep it under 1 MB"
  fi
}

main() {
  local tree sum libs_key bin_key libs bins run failed=0 h
  run_step "toolchain" ensure_clang
  tree=$(pj_tree)
  sum=$(tree_sum "$tree")
  libs_key=$( { echo "$sum"; clang --version | head -n1; cat "$engine_dir/config_site.h" "$engine_dir"/patches/*;
                echo "$SAN_FLAGS $LIB_CFLAGS"; declare -f build_libs collect_libs; } | sha256sum | cut -c1-16)
  libs="$cache_root/libs-$libs_key"
  if [ -f "$libs/DONE" ]; then
    step "cached sanitizer pjproject $(pj_version "$tree") libraries: $libs"
  else
    step "building sanitizer pjproject $(pj_version "$tree") libraries ($libs_key) from $tree"
    work=$(mktemp -d "${TMPDIR:-/tmp}/callrouter-fuzz-build.XXXXXX")
    trap 'rm -rf "$work"' EXIT   # global on purpose: the trap runs after main returns
    run_step "sanitizer libraries" build_libs "$tree" "$work"
    rm -rf "$libs.tmp"
    collect_libs "$work/pj" "$libs.tmp"
    echo "tree=$tree version=$(pj_version "$tree") sum=$sum" > "$libs.tmp/DONE"
    rm -rf "$libs"; mv "$libs.tmp" "$libs"
    rm -rf "$work"
  fi
  bin_key=$( { echo "$libs_key"; cat "$fuzz_dir/fuzz_guard_text.cpp" "$engine_dir/callrouter_guard_text.hpp";
               declare -f build_harnesses; } | sha256sum | cut -c1-16)
  bins="$libs/bin-$bin_key"
  if [ -x "$bins/fuzz-sip" ] && [ -x "$bins/fuzz_guard_text" ]; then
    step "cached harnesses: $bins"
  else
    rm -rf "$bins.tmp"
    run_step "harnesses" build_harnesses "$libs" "$bins.tmp" || { rm -rf "$bins.tmp"; return 1; }
    rm -rf "$bins"; mv "$bins.tmp" "$bins"
  fi
  run=$(mktemp -d "${TMPDIR:-/tmp}/callrouter-fuzz-run.XXXXXX")
  for h in "${harnesses[@]}"; do
    step "$h: fuzzing ${seconds}s (corpus tests/fuzz/corpus/$h, new inputs in $run/$h/new)"
    run_fuzz "$h" "$bins/$h" "$run" || failed=1
  done
  if [ "$failed" = 1 ]; then
    step "FAILED: crash input(s) and logs kept in $run"
    return 1
  fi
  rm -rf "$run"
  step "done: no crash"
}

main
