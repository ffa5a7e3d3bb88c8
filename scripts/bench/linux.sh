#!/usr/bin/env bash
# Linux benchmark: the small Linux of scripts/linux-kernel.sh (built from Debian's kernel
# source, cached) on baton, in a network namespace of its own. Each run boots it (2 vCPUs,
# 512 MiB shared memory, a 4-queue card on TAP tap0) and measures vm.boot to the kernel's
# "IP-Config: Complete"; then migrates it twice over UNIX sockets with local=on while the
# host pings it every 50 ms: with backend transfer, then without (the destination opens
# tap0 by name); then live-upgrades the last baton to a new process of the same binary.
# Figures: the median of RUNS runs (default 3); downtime and total as baton reports them,
# the longest gap between ping replies (the downtime seen from outside), pings lost (median
# and worst run); and, for comparison, the longest gap in 5 s of the same pings without a
# migration. With HOPS (default 0), each run then moves the guest HOPS more times with
# backend transfer, from baton to baton, and a last row gives min/median/max over the hops,
# with the median of each step of the pause under it.
# Kernel code is interpreted on nested PVM hosts: there these are correctness figures, not
# performance ones.
# Usage: scripts/bench/linux.sh [RUNS [HOPS]]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/common.sh
help_if_asked "$@"

RUNS=${1:-3}
HOPS=${2:-0}
[[ $RUNS =~ ^[0-9]+$ && $RUNS -gt 0 ]] || die "RUNS must be a positive number"
[[ $HOPS =~ ^[0-9]+$ ]] || die "HOPS must be a number"
ensure_build_deps
ensure_packages iproute2 iputils-ping
require_kvm
KERNEL_DIR=$(scripts/linux-kernel.sh)
cargo build --release --locked --workspace >&2

bench_work linux
bench_netns linux
log "kernel: $(cat "$KERNEL_DIR/version")"
printf '%-42s %11s %8s %11s %6s %6s\n' "Linux, 2 vCPUs, 4 queues (median of $RUNS)" \
    "downtime ms" "total ms" "ping gap ms" "lost" "worst"
run_helper "$WORK/out" ip netns exec "$NS" \
    python3 scripts/bench/linux.py "$WORK" "$KERNEL_DIR" "$RUNS" "$HOPS" ||
    die "the benchmark failed"
cat "$WORK/out"
echo "Pings: one every 50 ms. The new-TAP row loses what the kernel had queued on the"
echo "source's own queues of the multi-queue TAP when it went away."
