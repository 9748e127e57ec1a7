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
    ap.add_argument("--backend", action="append", help="only these of our backends (repeatable; default: all)")
    a = ap.parse_args()
    g = defaultdict(list)
    shapes = {}
    kernels = set()
    sys.path.insert(0, here)
    from openblas_gemm import SHAPES
    names = [s[0] for s in SHAPES]
    for p in range(a.passes):
        # Shape by shape, ours then OpenBLAS back to back: the machine's
        # drift over a pass then moves both sides of a ratio together.
        for name in names:
            rows = sum((lines([a.vgg16, "bench", "gemm", "--threads", str(a.threads), "--shape", name]
                              + (["--backend", b] if b else []))
                        for b in (a.backend or [None])), [])
            rows += lines([sys.executable, os.path.join(here, "openblas_gemm.py"), "--threads", str(a.threads),
                           "--shape", name])
            for r in rows:
                if r["backend"] == "openblas":
                    kernels.add(r.get("kernel") or "unknown")
                g[(r["name"], r["backend"])].append(r["gflops"])
                shapes[r["name"]] = (r["m"], r["k"], r["n"])
        print(f"pass {p + 1}/{a.passes} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in g.items()}
    ours = [b for b in dict.fromkeys(b for (_, b) in g) if b != "openblas"]
    # Ratios pass by pass (each pair measured back to back), then their
    # median: steadier than a ratio of medians on a drifting machine.
    ratio = {(name, b): statistics.median(x / y for x, y in zip(g[(name, b)], g[(name, "openblas")]))
             for name in shapes for b in ours}
    print(f"{a.passes} passes, {a.threads} threads; GFLOP/s medians; ratio = median of the per-pass ratios")
    # Which of its kernels OpenBLAS ran: a build that does not know the CPU
    # falls back to an older one (numpy's 0.3.31 runs Haswell's AVX2
    # kernels on a Zen 5 EPYC; OPENBLAS_CORETYPE=SkylakeX forces AVX-512).
    print(f"OpenBLAS kernel: {', '.join(sorted(kernels))}")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f" in flags and kernels & {"Haswell", "Zen", "Sandybridge"}:
        print("warning: this CPU has AVX-512 but OpenBLAS ran AVX2 kernels; "
              "set OPENBLAS_CORETYPE=SkylakeX for its AVX-512 ones", file=sys.stderr)
    print("| shape | m x k x n | " + " | ".join(ours) + " | OpenBLAS | " + " | ".join(f"{b} / OpenBLAS" for b in ours) + " |")
    print("| --- | --- |" + " --- |" * (2 * len(ours) + 1))
    for name, (m, k, n) in shapes.items():
        ob = med[(name, "openblas")]
        vals = [med[(name, b)] for b in ours]
        print(f"| {name} | {m} x {k} x {n} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {ob:.1f} | "
              + " | ".join(f"{ratio[(name, b)]:.2f}" for b in ours) + " |")

if __name__ == "__main__":
    main()
