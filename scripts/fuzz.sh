#!/usr/bin/env bash
# Runs baton's fuzz targets (fuzz/fuzz_targets: the HTTP parser, every API body, the
# command-line option parsers, a migration destination on an arbitrary stream, saved VM
# and device state, snapshot directories, virtio rings served by each device) with cargo fuzz (libFuzzer, AddressSanitizer) on the nightly toolchain,
# each for SECONDS (default 60), starting from the seed corpus in fuzz/seeds/TARGET. The
# corpus it grows and any crash go under ~/.cache/baton/fuzz, outside the repository; a
# crash fails the run and names the input that reproduces it. Installs cargo-fuzz if
# missing. Prints the executions each target ran.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/common.sh
help_if_asked "$@"

SECONDS_EACH=${1:-60}
[[ $SECONDS_EACH =~ ^[0-9]+$ && $SECONDS_EACH -gt 0 ]] || die "SECONDS must be a positive number"
shift || true
ensure_build_deps
# libfuzzer-sys builds libFuzzer from C++.
ensure_packages g++
rustup toolchain list | grep -q '^nightly' || die "the nightly toolchain is missing: rustup toolchain install nightly"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked >&2
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/baton/fuzz
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || mapfile -t TARGETS < <(cargo +nightly fuzz list --fuzz-dir fuzz)

log "building ${#TARGETS[@]} fuzz targets"
cargo +nightly fuzz build --fuzz-dir fuzz >&2
for target in "${TARGETS[@]}"; do
    corpus=$CACHE/corpus/$target
    mkdir -p "$corpus" "$CACHE/artifacts/$target"
    cp -n fuzz/seeds/"$target"/* "$corpus"/ 2>/dev/null || true
    out=$(cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$corpus" -- \
        -max_total_time="$SECONDS_EACH" -artifact_prefix="$CACHE/artifacts/$target/" \
        -print_final_stats=1 2>&1) || {
        printf '%s\n' "$out" | tail -40 >&2
        die "$target failed: the input that reproduces it is in $CACHE/artifacts/$target/"
    }
    runs=$(printf '%s\n' "$out" | sed -n 's/^stat::number_of_executed_units: *//p' | tail -1)
    printf '%s: %s executions in %s s\n' "$target" "${runs:-?}" "$SECONDS_EACH"
done
