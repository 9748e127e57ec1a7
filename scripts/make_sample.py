#!/usr/bin/env python3
"""Builds data/sample/cifar-10-batches-bin/ from a CIFAR-10 binary archive:
the first 100 records of each of data_batch_1..5.bin (500 training images)
and the first 100 of test_batch.bin, in the same binary format, plus
batches.meta.txt. About 1.8 MB; the one data folder the repo commits.

    python3 scripts/make_sample.py ../shared/data/cifar-10-binary.tar.gz
"""
import hashlib, os, sys, tarfile

REC = 3073
PER_FILE = 100
NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "batches.meta.txt"]

def main():
    src = sys.argv[1]
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample", "cifar-10-batches-bin")
    os.makedirs(out, exist_ok=True)
    with tarfile.open(src, "r:gz") as t:
        for m in t.getmembers():
            name = os.path.basename(m.name)
            if name not in NAMES or not m.isfile():
                continue
            data = t.extractfile(m).read()
            if name.endswith(".bin"):
                data = data[: PER_FILE * REC]
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
            print(name, len(data), hashlib.sha256(data).hexdigest())

if __name__ == "__main__":
    main()
