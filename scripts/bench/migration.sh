#!/usr/bin/env bash
# Migration benchmark: the test guest (1 vCPU, --memory shared=on) moves between two batons
# on this machine, driven through their APIs (vm.receive-migration, vm.send-migration).
# Rows: local=on over a UNIX socket (memory handed over as descriptors, nothing copied),
# pre-copy (local=off) over UNIX and over TCP on 127.0.0.1, each of an idle guest with 1 and
# 4 GiB, and pre-copy over UNIX of a 1 GiB guest rewriting memory (`dirty 256 200` typed on
# its console: 256 MiB at 200 MiB/s, migrated once the buffer has been written once).
# Figures are vm.send-migration's answer, the median of RUNS runs each (default 5); GB/s is
# memory_bytes / memory_ms, the throughput while memory was being sent.
# Usage: scripts/bench/migration.sh [RUNS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/common.sh
help_if_asked "$@"

RUNS=${1:-5}
[[ $RUNS =~ ^[0-9]+$ && $RUNS -gt 0 ]] || die "RUNS must be a positive number"
ensure_build_deps
require_kvm
cargo build --release --locked --workspace >&2
guest_cargo build --release --locked >&2

WORK=$(mktemp -d "${TMPDIR:-/tmp}/baton-bench-migration.XXXXXX")
HELPER=""
cleanup() {
    if [[ -n $HELPER ]]; then
        kill -TERM "$HELPER" 2>/dev/null || true
        wait "$HELPER" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# row LABEL MEM_MIB unix|tcp LOCAL(on|off) [DIRTY_COMMAND]: one line of the table.
row() {
    local label=$1 out
    shift
    python3 scripts/bench/migration.py "$WORK" "$1" "$2" "$3" "$RUNS" "${4:-}" >"$WORK/row" &
    HELPER=$!
    if wait "$HELPER"; then out=$(<"$WORK/row"); else out="failed"; fi
    HELPER=""
    printf '%-36s %s\n' "$label" "$out"
}

printf '%-36s %9s %11s %14s %10s %7s\n' "migration (median of $RUNS)" \
    "total ms" "downtime ms" "memory bytes" "iterations" "GB/s"
for gib in 1 4; do
    row "local=on unix, $gib GiB idle" $((gib << 10)) unix on
done
for gib in 1 4; do
    for transport in unix tcp; do
        row "pre-copy $transport, $gib GiB idle" $((gib << 10)) "$transport" off
    done
done
row "pre-copy unix, 1 GiB dirty 256 200" 1024 unix off "dirty 256 200"
row "pre-copy tcp, 1 GiB dirty 256 200" 1024 tcp off "dirty 256 200"
echo "GB/s = memory_bytes / memory_ms: the throughput while memory was being sent. An idle"
echo "guest has few non-zero pages; the dirty rows carry 256 MiB and more."
