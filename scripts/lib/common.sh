# Shared helpers for baton's scripts. Source it; it does nothing on its own.

# help_if_asked "$@": for -h/--help, prints the calling script's header comment and exits.
help_if_asked() {
    case "${1:-}" in
        -h | --help)
            sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
            exit 0
            ;;
    esac
}

# log MSG: progress to stderr, prefixed with the script's name.
log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ensure_packages PKG...: installs the Debian packages that are not installed yet.
# A warm machine costs one dpkg query and no network.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "need root to install: ${missing[*]}"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# ensure_rust: cargo with rustfmt and clippy, new enough for the workspace.
ensure_rust() {
    if [[ -f "$HOME/.cargo/env" ]]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null ||
        die "cargo not found: install Rust 1.85 or newer (https://rustup.rs) and rerun"
    cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"
}

# ensure_build_deps: everything building and testing baton needs on Debian.
ensure_build_deps() {
    ensure_packages gcc libc6-dev python3
    ensure_rust
}

# require_kvm: fail loudly when KVM is not usable (baton's tests need it).
require_kvm() {
    [[ -c /dev/kvm ]] || die "/dev/kvm is missing: baton needs KVM (enable virtualization or nested KVM)"
    [[ -r /dev/kvm && -w /dev/kvm ]] || die "no access to /dev/kvm: run as root or join the kvm group"
}

# guest_cargo CMD [ARGS...]: runs cargo on the test guest, which is a workspace of its own
# (see the top-level Cargo.toml), with its output in the main target/ directory so
# target/<profile>/baton-test-guest sits next to baton.
guest_cargo() {
    local cmd=$1
    shift
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    case "$cmd" in
        fmt) cargo fmt --manifest-path "$root/tests/guest/Cargo.toml" "$@" ;;
        *) cargo "$cmd" --manifest-path "$root/tests/guest/Cargo.toml" --target-dir "$root/target" "$@" ;;
    esac
}

# bench_work NAME: for benchmark NAME, a scratch directory $WORK, and traps that on exit
# stop the background helper $HELPER and delete the network namespace $NS (each if set,
# see run_helper and bench_netns) and remove $WORK.
bench_work() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/baton-bench-$1.XXXXXX")
    HELPER=""
    NS=""
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bench_cleanup() {
    if [[ -n $HELPER ]]; then
        kill -TERM "$HELPER" 2>/dev/null || true
        wait "$HELPER" 2>/dev/null || true
    fi
    if [[ -n $NS ]]; then
        ip netns del "$NS" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}

# bench_netns NAME: creates the network namespace $NS for benchmark NAME, loopback up; the
# traps of bench_work delete it.
bench_netns() {
    NS=baton-bench-$1-$$
    ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
}

# bench_migration_deps: what the benchmarks that move the test guest need: build tools,
# ip and ping, KVM, and release builds of baton and the guest.
bench_migration_deps() {
    ensure_build_deps
    ensure_packages iproute2 iputils-ping
    require_kvm
    cargo build --release --locked --workspace >&2
    guest_cargo build --release --locked >&2
}

# bench_row WIDTH LABEL CMD...: one row of a table: LABEL padded to WIDTH, then the line
# CMD prints (run as run_helper does), or "failed".
bench_row() {
    local width=$1 label=$2 out
    shift 2
    if run_helper "$WORK/row" "$@"; then
        out=$(<"$WORK/row")
    else
        out="failed"
    fi
    printf "%-${width}s %s\n" "$label" "$out"
}

# run_helper OUT CMD...: runs CMD in the background as $HELPER (stopped if this script is
# interrupted), its standard output to OUT; returns its status.
run_helper() {
    local out=$1 status=0
    shift
    "$@" >"$out" &
    HELPER=$!
    wait "$HELPER" || status=$?
    HELPER=""
    return "$status"
}
