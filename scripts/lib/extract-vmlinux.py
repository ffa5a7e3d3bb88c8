#!/usr/bin/env python3
"""Extract the ELF vmlinux from an x86 bzImage.

Usage: extract-vmlinux.py BZIMAGE OUT

The compressed kernel is located from the boot protocol header (Documentation/arch/x86/boot.rst):
  0x1f1 setup_sects   (0 means 4); protected-mode code starts at (setup_sects + 1) * 512
  0x202 header        "HdrS"
  0x206 version       boot protocol version, payload fields need >= 2.08
  0x248 payload_offset  offset of the compressed data from the start of protected-mode code
  0x24c payload_length  its length (the kernel's build appends the 4-byte decompressed size)

The format is detected by its magic and decompressed as one stream, ignoring trailing bytes.
gzip, xz, lzma and bzip2 use the Python standard library; zstd and lz4 have no stdlib module
and go through the `zstd` / `lz4` command-line tools, fed exactly one frame.

The decompressed data is vmlinux.bin (an ELF64 x86-64 image, symbols stripped), possibly followed
by the kernel's relocation table; the output is trimmed to the end of the ELF image.
Progress and a summary go to stderr. Exit status is non-zero with a message on any failure.
"""

import os
import struct
import subprocess
import sys
import tempfile


class ExtractError(Exception):
    pass


def log(msg):
    print(f"extract-vmlinux: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- boot protocol


def locate_payload(img):
    """Return (payload bytes, info dict) from the bzImage bytes."""
    if len(img) < 0x250 + 4:
        raise ExtractError(f"file too small for a bzImage ({len(img)} bytes)")
    if img[0x1FE:0x200] != b"\x55\xaa":
        raise ExtractError("no 0x55AA boot signature at 0x1fe: not a bzImage")
    if img[0x202:0x206] != b"HdrS":
        raise ExtractError('no "HdrS" setup header magic at 0x202: not a bzImage')
    setup_sects = img[0x1F1] or 4
    (version,) = struct.unpack_from("<H", img, 0x206)
    loadflags = img[0x211]
    proto = f"{version >> 8}.{version & 0xff:02d}"
    if version < 0x208:
        raise ExtractError(f"boot protocol {proto} < 2.08 has no payload_offset/payload_length")
    if not loadflags & 0x01:
        raise ExtractError("LOADED_HIGH not set: a zImage, not a bzImage")
    payload_offset, payload_length = struct.unpack_from("<II", img, 0x248)
    pm_start = (setup_sects + 1) * 512
    start = pm_start + payload_offset
    end = start + payload_length
    if payload_length == 0 or end > len(img):
        raise ExtractError(
            f"payload [{start:#x}, {end:#x}) outside the file ({len(img):#x} bytes)"
        )
    info = {
        "protocol": proto,
        "setup_sects": setup_sects,
        "pm_start": pm_start,
        "payload_start": start,
        "payload_length": payload_length,
    }
    return img[start:end], info


# ---------------------------------------------------------------- formats


def detect(data):
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if data[:4] == b"\x02\x21\x4c\x18":
        return "lz4"
    if data[:3] == b"BZh" and data[3:4].isdigit():
        return "bzip2"
    # legacy .lzma ("lzma_alone"): properties byte (lc/lp/pb, 0x5d for the defaults), 4-byte
    # dictionary size, 8-byte uncompressed size. The kernel's lzma payload starts 5d 00 00.
    if len(data) >= 13 and data[0] < 9 * 5 * 5 and data[1:3] == b"\x00\x00":
        return "lzma"
    if data[:3] == b"\x89LZ":
        return "lzo"
    raise ExtractError(f"unknown compression, payload starts with {data[:8].hex()}")


def stdlib_stream(decomp, data):
    """Run a stdlib decompressor object over one stream; return (output, unused trailing bytes)."""
    out = decomp.decompress(data)
    if not decomp.eof:
        raise ExtractError("compressed stream is truncated")
    return out, len(decomp.unused_data)


def decompress_gzip(data):
    import zlib

    return stdlib_stream(zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), data)


def decompress_xz(data):
    import lzma

    return stdlib_stream(lzma.LZMADecompressor(format=lzma.FORMAT_XZ), data)


def decompress_lzma(data):
    import lzma

    return stdlib_stream(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), data)


def decompress_bzip2(data):
    import bz2

    return stdlib_stream(bz2.BZ2Decompressor(), data)


def run_tool(argv, data):
    try:
        res = subprocess.run(argv, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise ExtractError(f"`{argv[0]}` is not installed (needed for this payload)") from None
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()
        raise ExtractError(f"`{' '.join(argv)}` failed ({res.returncode}): {err}")
    return res.stdout


def zstd_frame_length(data):
    """Length of the zstd frame at the start of data (RFC 8878 section 3.1.1)."""
    pos = 4
    fhd = data[pos]
    pos += 1
    fcs_flag, single_segment, checksum, dict_flag = fhd >> 6, fhd >> 5 & 1, fhd >> 2 & 1, fhd & 3
    if fhd >> 3 & 1:
        raise ExtractError("zstd frame header has its reserved bit set")
    if not single_segment:
        pos += 1  # window descriptor
    pos += (0, 1, 2, 4)[dict_flag]
    pos += (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    while True:
        if pos + 3 > len(data):
            raise ExtractError("zstd frame is truncated")
        hdr = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        pos += 3
        last, btype, bsize = hdr & 1, hdr >> 1 & 3, hdr >> 3
        if btype == 3:
            raise ExtractError("zstd block of reserved type")
        pos += 1 if btype == 1 else bsize
        if last:
            break
    pos += 4 if checksum else 0
    if pos > len(data):
        raise ExtractError("zstd frame is truncated")
    return pos


def decompress_zstd(data):
    n = zstd_frame_length(data)
    return run_tool(["zstd", "-d", "-c", "-q"], data[:n]), len(data) - n


def lz4_legacy_length(data):
    """Length of a legacy lz4 stream (magic, then blocks of 4-byte LE size + data)."""
    pos = 4
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if size == 0x184C2102:  # another legacy frame concatenated: magic repeats
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(data):
            break  # not a block: trailing data (the kernel appends the decompressed size)
        pos += 4 + size
    if pos == 4:
        raise ExtractError("lz4 legacy stream has no complete block")
    return pos


def decompress_lz4(data):
    n = lz4_legacy_length(data)
    return run_tool(["lz4", "-d", "-c", "-q"], data[:n]), len(data) - n


DECOMPRESSORS = {
    "gzip": decompress_gzip,
    "xz": decompress_xz,
    "lzma": decompress_lzma,
    "bzip2": decompress_bzip2,
    "zstd": decompress_zstd,
    "lz4": decompress_lz4,
}


# ---------------------------------------------------------------- ELF


def check_elf(out):
    """Verify an ELF64 little-endian x86-64 image; return (entry, end of the ELF image)."""
    if out[:4] != b"\x7fELF":
        raise ExtractError(f"decompressed data is not ELF (starts with {out[:8].hex()})")
    if out[4] != 2 or out[5] != 1:
        raise ExtractError(f"not ELF64 little-endian (class {out[4]}, data {out[5]})")
    (e_type, e_machine, _ver, e_entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum,
     e_shentsize, e_shnum, _shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", out, 16)
    if e_machine != 62:
        raise ExtractError(f"ELF machine {e_machine} is not x86-64 (62)")
    if e_type != 2:
        raise ExtractError(f"ELF type {e_type} is not ET_EXEC (2)")
    end = max(64, e_phoff + e_phnum * e_phentsize, e_shoff + e_shnum * e_shentsize)
    for i in range(e_phnum):
        _t, _f, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", out, e_phoff + i * e_phentsize)
        end = max(end, p_offset + p_filesz)
    for i in range(e_shnum):
        _n, sh_type, _f, _a, sh_offset, sh_size = struct.unpack_from(
            "<IIQQQQ", out, e_shoff + i * e_shentsize)
        if sh_type != 8:  # SHT_NOBITS occupies no file space
            end = max(end, sh_offset + sh_size)
    if end > len(out):
        raise ExtractError(f"ELF image claims {end} bytes but only {len(out)} were decompressed")
    return e_entry, end


# ---------------------------------------------------------------- main


def extract(src, dst):
    with open(src, "rb") as f:
        img = f.read()
    payload, info = locate_payload(img)
    fmt = detect(payload)
    log(
        f"{src}: boot protocol {info['protocol']}, setup_sects {info['setup_sects']}, "
        f"payload {fmt} at {info['payload_start']:#x} ({info['payload_length']} bytes)"
    )
    if fmt not in DECOMPRESSORS:
        raise ExtractError(f"{fmt} payloads are not supported")
    out, trailing = DECOMPRESSORS[fmt](payload)
    if trailing == 4:
        # The kernel build appends the decompressed size (little-endian u32): cross-check it.
        (size,) = struct.unpack_from("<I", payload, len(payload) - 4)
        if size != len(out) & 0xFFFFFFFF:
            raise ExtractError(f"decompressed {len(out)} bytes, header says {size}")
    elif trailing:
        log(f"ignoring {trailing} bytes after the {fmt} stream")
    entry, end = check_elf(out)
    if end < len(out):
        log(f"dropping {len(out) - end} bytes after the ELF image (relocation table)")
    d = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".extract-vmlinux.", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(out[:end])
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise
    log(f"wrote {dst}: ELF64 x86-64, {end} bytes, entry {entry:#x}")


def main(argv):
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if len(argv) == 2 and argv[1] in ("-h", "--help") else 2
    try:
        extract(argv[1], argv[2])
    except (ExtractError, OSError) as e:
        print(f"extract-vmlinux: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
