#!/usr/bin/env bash
# Device benchmark with the test guest: TCP throughput guest->host (the guest's sequence
# stream) and host->guest (checked by the guest), ping round-trip time, and virtio-blk
# sequential write and read, each VMM in a network namespace of its own with its own TAP.
# Rows: baton with 1 and 4 queue pairs (the guest polls its rings), and with MSI-X
# interrupts (virtio=irq); the last two again with --seccomp false, for the cost of the
# seccomp filters (a BPF run per system call on every thread). One TCP connection at a time, so one pair carries each test. With BENCH_QEMU=1 (installs qemu-system-x86) the
# same guest ELF also runs on QEMU (q35, virtio-net-pci on a TAP, virtio-blk-pci) as an
# outside reference. Sizes: BENCH_TCP_MIB (default 256), BENCH_DISK_MIB (default 256).
# Usage: scripts/bench/io.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/common.sh
help_if_asked "$@"

ensure_build_deps
ensure_packages iproute2 iputils-ping
require_kvm
[[ ${BENCH_QEMU:-0} == 1 ]] && ensure_packages qemu-system-x86
cargo build --release --locked -p vmm >&2
guest_cargo build --release --locked >&2
BATON=$PWD/target/release/baton
GUEST=$PWD/target/release/baton-test-guest
CMDLINE="heartbeat_ms=0 net=10.0.0.2/24"

# run NAME JSON-CMD: one row, in a fresh namespace.
run() {
    local name=$1 cmd=$2 ns="baton-bench-$$"
    ip netns add "$ns"
    local out
    out=$(BENCH_VMM_CMD=$cmd ip netns exec "$ns" python3 scripts/bench/io.py) || true
    ip netns del "$ns"
    printf '%-28s %s\n' "$name" "${out:-failed}"
}

# baton_cmd NUM_QUEUES [GUEST_OPTIONS [SECCOMP]]
baton_cmd() {
    printf '["%s","--kernel","%s","--cmdline","%s","--memory","size=1G","--serial","socket={serial}","--net","tap=tap0,num_queues=%s","--disk","path={disk}","--seccomp","%s"]' \
        "$BATON" "$GUEST" "$CMDLINE${2:+ $2}" "$1" "${3:-true}"
}

run "baton, 1 queue pair" "$(baton_cmd 2)"
run "baton, 4 queue pairs" "$(baton_cmd 8)"
run "baton, 1 pair, MSI-X" "$(baton_cmd 2 virtio=irq)"
run "  the same, no seccomp" "$(baton_cmd 2 virtio=irq false)"
run "baton, 4 pairs, no seccomp" "$(baton_cmd 8 "" false)"
if command -v qemu-system-x86_64 >/dev/null; then
    qemu='["qemu-system-x86_64","-machine","q35,accel=kvm","-m","1G","-nodefaults","-nographic","-kernel","'"$GUEST"'","-append","'"$CMDLINE"'","-serial","unix:{serial},server=on,wait=off","-netdev","tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off","-device","virtio-net-pci,netdev=n0,disable-legacy=on,romfile=","-drive","file={disk},format=raw,if=none,id=d0","-device","virtio-blk-pci,drive=d0,disable-legacy=on"]'
    run "QEMU 7.2 q35 (reference)" "$qemu"
fi
