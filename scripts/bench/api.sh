#!/usr/bin/env bash
# API latency benchmark: GET vmm.ping on baton's API socket, a new connection per request
# and one kept-alive connection, min/median/p99 in microseconds over RUNS requests (default
# 2000). The client writes requests as Cloud Hypervisor's api_client does. If
# BENCH_CH=/path/to/cloud-hypervisor is set, the same is measured against that binary.
# Usage: scripts/bench/api.sh [RUNS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/common.sh
help_if_asked "$@"

RUNS=${1:-2000}
[[ $RUNS =~ ^[0-9]+$ && $RUNS -gt 0 ]] || die "RUNS must be a positive number"
ensure_build_deps
cargo build --release --locked -p vmm >&2
DIR=$(mktemp -d)
PID=""
cleanup() {
    [[ -n $PID ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT

# measure NAME CMD...: starts the VMM CMD (API socket $DIR/api.sock), benchmarks it, stops it.
measure() {
    local name=$1
    shift
    rm -f "$DIR/api.sock"
    "$@" >"$DIR/vmm.log" 2>&1 &
    PID=$!
    local deadline=$((SECONDS + 20))
    until [[ -S $DIR/api.sock ]]; do
        ((SECONDS < deadline)) || die "$name did not create its API socket: $(cat "$DIR/vmm.log")"
        kill -0 "$PID" 2>/dev/null || die "$name exited: $(cat "$DIR/vmm.log")"
        sleep 0.05
    done
    echo "== $name"
    python3 scripts/bench/api.py "$DIR/api.sock" "$RUNS"
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
}

measure baton target/release/baton --api-socket "path=$DIR/api.sock"
if [[ -n ${BENCH_CH:-} ]]; then
    measure cloud-hypervisor "$BENCH_CH" --api-socket "path=$DIR/api.sock"
fi
