#!/usr/bin/env bash
# The API under a connection flood: N idle and N slow connections (default 4000 each) held
# open while vmm.ping is timed on new connections; prints the ping latency and baton's
# descriptor and thread counts (scripts/bench/api_flood.py).
# Usage: scripts/bench/api_flood.sh [N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/common.sh
help_if_asked "$@"

N=${1:-4000}
[[ $N =~ ^[0-9]+$ && $N -gt 0 ]] || die "N must be a positive number"
ensure_build_deps
cargo build --release --locked -p vmm >&2
DIR=$(mktemp -d)
target/release/baton --api-socket "path=$DIR/api.sock" >"$DIR/vmm.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
deadline=$((SECONDS + 20))
until [[ -S $DIR/api.sock ]]; do
    ((SECONDS < deadline)) || die "baton did not create its API socket: $(cat "$DIR/vmm.log")"
    sleep 0.05
done
python3 scripts/bench/api_flood.py "$DIR/api.sock" "$PID" "$N"
