#!/usr/bin/env bash
# Runs every check baton has: formatting, clippy with warnings denied, unit tests and the
# integration tests that boot real guests on KVM (baton's test guest, and a small Linux
# built from Debian's kernel source by scripts/linux-kernel.sh, cached outside the
# repository) and, on QEMU, the test guest again; then api/openapi.yaml against a running
# baton with schemathesis (scripts/schemathesis.sh); and every fuzz target for 20 seconds
# (scripts/fuzz.sh, nightly toolchain). Installs what it needs on Debian.
# Usage: scripts/test.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/common.sh

help_if_asked "$@"

ensure_build_deps
# qemu-system-x86: tests/tests/qemu.rs boots the test guest on QEMU.
ensure_packages iproute2 iputils-ping qemu-system-x86
require_kvm
BATON_LINUX_DIR=$(scripts/linux-kernel.sh)
export BATON_LINUX_DIR

log "cargo fmt --check"
cargo fmt --all -- --check
guest_cargo fmt -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The queue entry points the fuzz targets use exist only with this feature.
cargo clippy -p devices --features fuzzing --locked -- -D warnings
guest_cargo clippy --all-targets --locked -- -D warnings
log "cargo build"
cargo build --workspace --locked
guest_cargo build --locked
log "cargo test"
guest_cargo test --lib --locked
cargo test --workspace --locked -- "$@"
log "schemathesis"
BATON=target/debug/baton scripts/schemathesis.sh
log "fuzz targets, 20 s each"
scripts/fuzz.sh 20
