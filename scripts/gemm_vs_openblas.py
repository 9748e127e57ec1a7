#!/usr/bin/env python3
"""Side-by-side SGEMM table: our backends vs OpenBLAS (numpy), alternating
`vgg16 bench gemm` and scripts/openblas_gemm.py for --passes passes in one
run, then the median GFLOP/s of each as a Markdown table.

    cargo build --release && python3 scripts/gemm_vs_openblas.py --threads 2 --passes 3
"""
import argparse, json, os, statistics, subprocess, sys
from collections import defaultdict

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)

def lines(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.strip()]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--vgg16", default=os.path.join(root, "target", "release", "vgg16"))
    a = ap.parse_args()
    g = defaultdict(list)
    shapes = {}
    for p in range(a.passes):
        for r in lines([a.vgg16, "bench", "gemm", "--threads", str(a.threads)]) + \
                 lines([sys.executable, os.path.join(here, "openblas_gemm.py"), "--threads", str(a.threads)]):
            g[(r["name"], r["backend"])].append(r["gflops"])
            shapes[r["name"]] = (r["m"], r["k"], r["n"])
        print(f"pass {p + 1}/{a.passes} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in g.items()}
    print(f"| shape | m x k x n | gemm backend | matrixmultiply | OpenBLAS | gemm / OpenBLAS | matrixmultiply / OpenBLAS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (m, k, n) in shapes.items():
        ge, mm, ob = med[(name, "gemm")], med[(name, "matrixmultiply")], med[(name, "openblas")]
        print(f"| {name} | {m} x {k} x {n} | {ge:.1f} | {mm:.1f} | {ob:.1f} | {ge / ob:.2f} | {mm / ob:.2f} |")

if __name__ == "__main__":
    main()
