#!/usr/bin/env python3
"""Seed inputs for the fuzz targets, written into fuzz/corpus/<target>/ (git-ignored).

Called by scripts/fuzz.sh. Builds, by hand from docs/FORMAT.md's layouts, a few valid
manifests (raw bodies, versions 3 and 2) and packs (frames of every encoding, zstd by the
`zstd` command if it is installed), and a few delta inputs, so the fuzzer starts from
inputs that get past the magic, the version and the checksums. Writing an existing seed
again is harmless; libFuzzer adds what it finds next to them.
"""

import os
import shutil
import struct
import subprocess
import sys
import zlib

PAGE = 65536


def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def manifest_body(version):
    """The body of the `sample()` manifest of src/store/manifest.rs's tests."""
    b = bytearray()
    b += varint(42) + bytes([9] * 16) + bytes([7] * 32)
    b += varint(123456) + varint(7890)
    if version != 2:
        pos_in, pos_out = b"opaque input position", bytes([0, 1, 2, 255])
        b += varint(len(pos_in)) + pos_in + varint(len(pos_out)) + pos_out
    b += struct.pack("<Q", 5) + varint(64) + varint(1_700_000_000_000)
    b += bytes([3]) + varint((-3) & 0xFFFFFFFF)  # ProgramExited(-3)
    b += varint(2) + bytes([9] * 16) + bytes([8] * 16)  # writers
    b += varint(2)  # packs: generation, writer, frames, bytes
    b += varint(41) + varint(0) + varint(10) + varint(5000)
    b += varint(42) + varint(1) + varint(3) + varint(700)
    b += varint(5)  # globals
    b += bytes([0]) + struct.pack("<I", (-5) & 0xFFFFFFFF)
    b += bytes([1]) + struct.pack("<Q", 1 << 40)
    b += bytes([2]) + struct.pack("<f", 1.5)
    b += bytes([3]) + struct.pack("<d", 2.5)
    b += bytes([4]) + ((1 << 128) - 2).to_bytes(16, "little")
    b += varint(2)  # memories
    b += varint(16 << 16) + struct.pack("<Q", 0xDEADBEEF) + varint(2)
    b += varint(2)  # layer 0: runs of (gap, pages, pack, first frame)
    b += varint(0) + varint(4) + varint(0) + varint(2)
    b += varint(5) + varint(1) + varint(1) + varint(0)
    b += varint(1)  # layer 1
    b += varint(1) + varint(2) + varint(1) + varint(1)
    b += varint(0) + struct.pack("<Q", 1) + varint(0)
    return bytes(b)


def manifest(version, body):
    head = b"WASNAPMF" + struct.pack("<HHII", version, 0, len(body), len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head))


def zstd(data):
    """zstd-compressed `data`, or None without the `zstd` command."""
    if shutil.which("zstd") is None:
        return None
    return subprocess.run(
        ["zstd", "-q", "-c", "-1"], input=data, stdout=subprocess.PIPE, check=True
    ).stdout


def sparse_stream(changes):
    """A sparse delta stream (encoding 5) for a 64 KiB page: {word index: difference}."""
    s = bytearray(varint(len(changes)))
    nxt = 0
    for i in sorted(changes):
        s += varint(i - nxt)
        nxt = i + 1
    for i in sorted(changes):
        d = changes[i]
        s += varint(((d << 1) ^ (d >> 31)) & 0xFFFFFFFF)
    return bytes(s)


def pack(frames):
    """A pack of (encoding, payload) frames."""
    out = bytearray(b"WASNAPPK" + struct.pack("<HHIQ", 2, 0, len(frames), 7) + bytes([3] * 16))
    for enc, payload in frames:
        out += struct.pack("<II", len(payload), zlib.crc32(bytes([enc]) + payload)) + bytes([enc])
        out += payload
    return bytes(out)


def write(root, target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def main(root):
    v3, v2 = manifest_body(3), manifest_body(2)
    write(root, "manifest_decode", "v3", manifest(3, v3))
    write(root, "manifest_decode", "v2", manifest(2, v2))
    write(root, "manifest_body", "v3", bytes([0]) + v3)
    write(root, "manifest_body", "v2", bytes([1]) + v2)
    write(root, "manifest_body", "v3-zstd", bytes([2]) + v3)

    page = bytes((i * 31 >> 3) & 0xFF for i in range(PAGE))
    xor = bytearray(PAGE)
    xor[100] = 1
    xor[40000:40004] = b"abcd"
    stream = sparse_stream({3: 1, 500: -2, 16383: 77})
    raw = [(1, page), (2, bytes(xor)), (4, bytes(xor)), (5, stream)]
    compressed = [(enc, zstd(p)) for enc, p in raw]
    if all(p is not None for _, p in compressed):
        write(root, "pack_parse", "frames", pack(compressed))
    write(root, "pack_parse", "raw-frames", pack([(e, p[:64]) for e, p in raw]))
    write(root, "pack_parse", "empty", pack([]))

    for control in (0x00, 0x05, 0x0A, 0x0F, 0x13, 0x26, 0x39):
        write(root, "delta_codecs", "%02x" % control, bytes([control]) + bytes(range(64)) * 3)
    write(root, "delta_codecs", "sparse", bytes([0x04]) + stream + stream)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
