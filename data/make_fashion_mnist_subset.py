#!/usr/bin/env python3
"""Writes the shipped Fashion-MNIST subset under data/fashion-mnist/.

Source: Debian's `dataset-fashion-mnist` package (the upstream files by
Zalando SE, MIT licence; Debian recompressed them, the decoded bytes match):

    apt-get download dataset-fashion-mnist
    dpkg-deb -x dataset-fashion-mnist_*_all.deb fmx
    python3 data/make_fashion_mnist_subset.py fmx/usr/share/datasets/fashion-mnist

Takes the first 1,000 images of each class from the training file and the
first 200 of each class from the test file, in file order (10,000 + 2,000,
class-balanced), and writes them as gzipped IDX files (gzip mtime 0, so the
bytes are reproducible) with their SHA-256 sums.
"""
import gzip
import hashlib
import os
import struct
import sys


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return dims, data[4 + 4 * ndim:]


def write_idx(path, magic, dims, payload):
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims)
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(header + payload)


def subset(src, prefix, per_class, out, out_prefix):
    (n, h, w), pixels = read_idx(os.path.join(src, f"{prefix}-images-idx3-ubyte.gz"))
    (n2,), labels = read_idx(os.path.join(src, f"{prefix}-labels-idx1-ubyte.gz"))
    assert n == n2
    taken = {c: 0 for c in range(10)}
    keep = []
    for i in range(n):
        c = labels[i]
        if taken[c] < per_class:
            taken[c] += 1
            keep.append(i)
    size = h * w
    img = b"".join(pixels[i * size:(i + 1) * size] for i in keep)
    lab = bytes(labels[i] for i in keep)
    write_idx(os.path.join(out, f"{out_prefix}-images-idx3-ubyte.gz"), 0x803, (len(keep), h, w), img)
    write_idx(os.path.join(out, f"{out_prefix}-labels-idx1-ubyte.gz"), 0x801, (len(keep),), lab)
    return len(keep)


def main():
    src = sys.argv[1]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion-mnist")
    os.makedirs(out, exist_ok=True)
    print("train", subset(src, "train", 1000, out, "train"))
    print("test", subset(src, "t10k", 200, out, "t10k"))
    lines = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".gz"):
            with open(os.path.join(out, name), "rb") as f:
                lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {name}\n")
    with open(os.path.join(out, "SHA256SUMS"), "w") as f:
        f.writelines(lines)


if __name__ == "__main__":
    main()
