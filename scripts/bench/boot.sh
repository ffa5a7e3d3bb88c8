#!/usr/bin/env bash
# Boot benchmark: wall time from starting baton to the test guest's ready marker, and
# baton's own set-up time before the first KVM_RUN (its "built in N us" log line), as the
# median of RUNS runs (default 10) for 1 and 4 vCPUs with 512 MiB and 4 GiB.
# If qemu-system-x86_64 is installed (BENCH_QEMU=1 installs it), the same guest ELF is also
# timed on QEMU's microvm machine as an outside reference.
# Usage: scripts/bench/boot.sh [RUNS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/common.sh
help_if_asked "$@"

RUNS=${1:-10}
[[ $RUNS =~ ^[0-9]+$ && $RUNS -gt 0 ]] || die "RUNS must be a positive number"
ensure_build_deps
require_kvm
[[ ${BENCH_QEMU:-0} == 1 ]] && ensure_packages qemu-system-x86
cargo build --release --locked -p vmm >&2
guest_cargo build --release --locked >&2
BATON=target/release/baton
GUEST=target/release/baton-test-guest

now_us() { echo $(($(date +%s%N) / 1000)); }

# one_run CMD...: prints "total_us setup_us" for one boot of CMD (setup_us is 0 if unknown).
one_run() {
    local start line total="" setup=0 pid
    start=$(now_us)
    coproc RUN { exec "$@" 2>&1; }
    pid=$RUN_PID
    while IFS= read -r -t 60 line <&"${RUN[0]}"; do
        case $line in
            *"built in "*" us"*)
                setup=${line##*built in }
                setup=${setup%% us*}
                ;;
            *"baton-test-guest: ready"*)
                total=$(($(now_us) - start))
                break
                ;;
        esac
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [[ -n $total ]] || die "no ready marker from: $*"
    echo "$total $setup"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2))}'; }

bench() {
    local label=$1; shift
    local totals=() setups=() r t s
    for ((r = 0; r < RUNS; r++)); do
        read -r t s < <(one_run "$@")
        totals+=("$t")
        setups+=("$s")
    done
    printf '%-34s %10s %10s\n' "$label" \
        "$(printf '%s\n' "${totals[@]}" | median | awk '{printf "%.1f", $1/1000}')" \
        "$(printf '%s\n' "${setups[@]}" | median | awk '{printf "%.2f", $1/1000}')"
}

printf '%-34s %10s %10s\n' "boot to ready marker (median of $RUNS)" "total ms" "setup ms"
for cpus in 1 4; do
    for mem in 512M 4G; do
        bench "baton  cpus=$cpus mem=$mem" "$BATON" -v --kernel "$GUEST" \
            --cmdline heartbeat_ms=0 --cpus "boot=$cpus" --memory "size=$mem" --serial tty
    done
done
if command -v qemu-system-x86_64 >/dev/null; then
    for cpus in 1 4; do
        for mem in 512M 4G; do
            bench "qemu microvm cpus=$cpus mem=$mem" qemu-system-x86_64 -M microvm \
                -accel kvm -smp "$cpus" -m "$mem" -nodefaults -no-user-config \
                -display none -serial stdio -kernel "$GUEST" -append heartbeat_ms=0
        done
    done
fi
