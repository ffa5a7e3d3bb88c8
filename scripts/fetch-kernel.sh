#!/usr/bin/env bash
# Fetch the Debian cloud kernel and cache its bzImage, ELF vmlinux and config outside the repo.
# Usage: dir=$(scripts/fetch-kernel.sh)   (see --help)
set -euo pipefail

META=linux-image-cloud-amd64
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EXTRACT="$SCRIPT_DIR/lib/extract-vmlinux.py"

usage() {
    cat <<EOF
Usage: $(basename "$0") [--help]

Fetches the Debian cloud kernel (the package the metapackage $META depends on,
e.g. linux-image-6.1.0-NN-cloud-amd64) with 'apt-get download', and caches in
  \$BATON_CACHE/kernel/<package>_<version>/
    vmlinuz   the bzImage (/boot/vmlinuz-* from the .deb)
    vmlinux   the ELF kernel extracted from it (boots through its PVH entry)
    config    the kernel's /boot/config-*
    package   "<package> <version>"
  \$BATON_CACHE/kernel/current -> that directory
Prints the cache directory as the last line of stdout; progress goes to stderr:
  dir=\$(scripts/fetch-kernel.sh)

A complete cache for the version apt resolves is reused without touching the network.
'apt-get update' runs at most once, only when apt knows no candidate for the package or
the download fails (stale lists). If no version can be resolved (e.g. offline with no apt
lists) and exactly one complete cached version exists, that one is used.
Missing tools (python3, xz, zstd, lz4) are installed with apt-get (needs root).

Environment:
  BATON_CACHE   cache root (default: \$HOME/.cache/baton)
EOF
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

log() { printf 'fetch-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

CACHE_ROOT=${BATON_CACHE:-${HOME:?HOME is not set}/.cache/baton}
KDIR="$CACHE_ROOT/kernel"
APT_OPTS=(-o DPkg::Lock::Timeout=600)

UPDATED=0
apt_update_once() {
    [[ $UPDATED == 0 ]] || return 1
    UPDATED=1
    log "running apt-get update"
    apt-get "${APT_OPTS[@]}" update -qq >&2 || log "apt-get update failed"
    return 0
}

# complete DIR: all cached files are there and non-empty.
complete() {
    local f
    for f in vmlinuz vmlinux config package; do
        [[ -s "$1/$f" ]] || return 1
    done
}

# candidate PKG: apt's candidate version of PKG, empty if none.
candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2; exit }'
}

# resolve: sets PKG and VER from the metapackage's current dependency; returns 1 if apt can't.
resolve() {
    local meta_ver dep
    local -a deps
    meta_ver=$(candidate "$META")
    [[ -n $meta_ver ]] || return 1
    # Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)  [alternatives separated by |]
    mapfile -t deps < <(apt-cache show "$META=$meta_ver" 2>/dev/null |
        sed -n 's/^Depends: //p' | head -n1 | sed 's/[,|]/\n/g' |
        sed -E 's/^ +//; s/[ (].*//' | grep -E '^linux-image-.*cloud-amd64' || true)
    ((${#deps[@]})) || die "$META $meta_ver has no linux-image-*-cloud-amd64 dependency"
    # Prefer the package named in Depends; fall back to an -unsigned build of it.
    for dep in "${deps[@]}" "${deps[@]/%/-unsigned}"; do
        VER=$(candidate "$dep")
        if [[ -n $VER ]]; then
            PKG=$dep
            return 0
        fi
    done
    die "$META $meta_ver depends on ${deps[*]} but apt has no candidate for it"
}

# Only this run's own temp dirs are removed on exit.
TMP=""
# shellcheck disable=SC2317  # invoked by the trap
cleanup() { [[ -z $TMP ]] || rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$KDIR"
# Serialize concurrent runs (parallel tests) on the cache.
exec 9>"$KDIR/.lock"
flock 9
# Holding the lock, any temp dir left is from an interrupted run.
rm -rf "$KDIR"/.tmp.* "$KDIR"/.current.*

set_current() {
    ln -sfn "$(basename "$1")" "$KDIR/.current.$$"
    mv -Tf "$KDIR/.current.$$" "$KDIR/current"
}

finish() {
    set_current "$1"
    log "kernel: $(cat "$1/package") in $1"
    printf '%s\n' "$1"
    exit 0
}

PKG="" VER=""
if ! resolve; then
    apt_update_once || true
    if ! resolve; then
        mapfile -t cached < <(for d in "$KDIR"/*/; do
            d=${d%/}
            [[ -L $d ]] || ! complete "$d" || printf '%s\n' "$d"
        done)
        if [[ ${#cached[@]} == 1 ]]; then
            log "apt can't resolve $META; using the only cached kernel"
            finish "${cached[0]}"
        fi
        die "apt can't resolve $META and ${#cached[@]} complete cached versions exist in $KDIR"
    fi
fi

DEST="$KDIR/${PKG}_${VER//:/%3a}"
if complete "$DEST"; then
    finish "$DEST"
fi

# Tools: dpkg-deb and apt come with Debian; install the rest only if missing.
need=()
command -v python3 >/dev/null || need+=(python3)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
command -v lz4 >/dev/null || need+=(lz4)
if ((${#need[@]})); then
    ((EUID == 0)) || die "missing ${need[*]}; install them (needs root)"
    log "installing ${need[*]}"
    if ! apt-get "${APT_OPTS[@]}" install -y -qq "${need[@]}" >&2; then
        apt_update_once || die "apt-get install ${need[*]} failed"
        apt-get "${APT_OPTS[@]}" install -y -qq "${need[@]}" >&2
    fi
fi

TMP=$(mktemp -d "$KDIR/.tmp.XXXXXX")
dl_opts=()
# As root, apt drops to the _apt user for downloads, which can't write to our 0700 temp dir.
((EUID != 0)) || dl_opts=(-o APT::Sandbox::User=root)
log "downloading $PKG $VER"
if ! (cd "$TMP" && apt-get "${dl_opts[@]}" download -q "$PKG=$VER" >&2); then
    # The lists may be stale (old versions leave the security pool): update and re-resolve.
    apt_update_once || die "apt-get download $PKG=$VER failed"
    resolve || die "apt can't resolve $META after apt-get update"
    DEST="$KDIR/${PKG}_${VER//:/%3a}"
    if complete "$DEST"; then
        finish "$DEST"
    fi
    log "downloading $PKG $VER"
    (cd "$TMP" && apt-get "${dl_opts[@]}" download -q "$PKG=$VER" >&2)
fi
debs=("$TMP"/*.deb)
[[ -f ${debs[0]} ]] || die "apt-get download left no .deb"

log "unpacking /boot from $(basename "${debs[0]}")"
mkdir "$TMP/root" "$TMP/out"
dpkg-deb --fsys-tarfile "${debs[0]}" | tar -x -C "$TMP/root" --wildcards './boot/*'
vmlinuz=("$TMP"/root/boot/vmlinuz-*)
config=("$TMP"/root/boot/config-*)
[[ ${#vmlinuz[@]} == 1 && -f ${vmlinuz[0]} ]] || die "expected one /boot/vmlinuz-* in the package"
[[ ${#config[@]} == 1 && -f ${config[0]} ]] || die "expected one /boot/config-* in the package"
cp "${vmlinuz[0]}" "$TMP/out/vmlinuz"
cp "${config[0]}" "$TMP/out/config"
python3 "$EXTRACT" "$TMP/out/vmlinuz" "$TMP/out/vmlinux"
printf '%s %s\n' "$PKG" "$VER" >"$TMP/out/package"
chmod 755 "$TMP/out"
complete "$TMP/out" || die "incomplete result in $TMP/out"

# Atomic publish: a leftover incomplete dir (only possible by hand) is replaced.
[[ ! -e $DEST ]] || rm -rf "$DEST"
mv -T "$TMP/out" "$DEST"
finish "$DEST"
