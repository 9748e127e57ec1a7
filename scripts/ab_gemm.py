#!/usr/bin/env python3
"""Two builds of `vgg16` alternated on `vgg16 bench gemm`, shape by shape:
per-round GFLOP/s, the median of the per-round ratios (second / first) and
how many rounds the second won. For a change's before/after on a noisy
machine, where only alternation in one run is fair.

    python3 scripts/ab_gemm.py OLD_VGG16 NEW_VGG16 --threads 1 --rounds 8 \
        --backend own-avx2 --shape 224_b1_block4_conv2 --shape square_2048
"""
import argparse, json, statistics, subprocess
from collections import defaultdict


def run(binary, a):
    cmd = [binary, "bench", "gemm", "--threads", str(a.threads), "--backend", a.backend,
           "--min-time", str(a.min_time)]
    for s in a.shape or []:
        cmd += ["--shape", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--backend", default="own-avx2")
    ap.add_argument("--min-time", type=float, default=1.5)
    ap.add_argument("--shape", action="append", help="repeatable; default: every shape")
    a = ap.parse_args()
    g = defaultdict(list)
    for r in range(a.rounds):
        # Alternate which goes first, so drift within a round evens out.
        order = [0, 1] if r % 2 == 0 else [1, 0]
        for i in order:
            for row in run([a.first, a.second][i], a):
                g[(row["name"], i)].append(row["gflops"])
    print(f"{a.rounds} rounds, {a.threads} thread(s), backend {a.backend}; GFLOP/s per round")
    print("| shape | first | second | median ratio | rounds second ahead |")
    print("| --- | --- | --- | --- | --- |")
    for name in dict.fromkeys(n for (n, _) in g):
        x, y = g[(name, 0)], g[(name, 1)]
        ratio = statistics.median(b / a for a, b in zip(x, y))
        wins = sum(b > a for a, b in zip(x, y))
        print(f"| {name} | {' '.join(f'{v:.0f}' for v in x)} | {' '.join(f'{v:.0f}' for v in y)} "
              f"| {ratio:.3f} | {wins} of {len(x)} |")


if __name__ == "__main__":
    main()
