#!/usr/bin/env python3
"""OpenBLAS (through numpy) SGEMM at the same shapes as `vgg16 bench gemm`,
one JSON object a line, for a side-by-side comparison in one run:

    python3 scripts/openblas_gemm.py --threads 2

Needs `pip install numpy threadpoolctl`. Median of repeated runs, like ours.
"""
import argparse, json, time

SHAPES = [
    ("224_b1_block1_conv2", 50176, 576, 64),
    ("224_b1_block3_conv2", 3136, 2304, 256),
    ("224_b1_block4_conv2", 784, 4608, 512),
    ("224_b1_block5_conv2", 196, 4608, 512),
    ("32_b64_block1_conv2", 65536, 576, 64),
    ("32_b64_block4_conv2", 1024, 4608, 512),
    ("32_b64_block5_conv2", 256, 4608, 512),
    ("square_2048", 2048, 2048, 2048),
]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--shape", action="append", help="only this shape (repeatable)")
    args = ap.parse_args()
    import numpy as np
    from threadpoolctl import threadpool_limits, threadpool_info
    with threadpool_limits(limits=args.threads, user_api="blas"):
        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        for name, m, k, n in SHAPES:
            if args.shape and name not in args.shape:
                continue
            rng = np.random.default_rng(0)
            a = rng.random((m, k), dtype=np.float32)
            b = rng.random((k, n), dtype=np.float32)
            c = np.empty((m, n), dtype=np.float32)
            np.matmul(a, b, out=c)
            times, start = [], time.perf_counter()
            while len(times) < 5 or time.perf_counter() - start < args.min_time:
                t = time.perf_counter()
                np.matmul(a, b, out=c)
                times.append(time.perf_counter() - t)
            times.sort()
            sec = times[len(times) // 2]
            print(json.dumps({"name": name, "m": m, "k": k, "n": n, "threads": args.threads,
                              "backend": "openblas", "gflops": round(2 * m * k * n / sec / 1e9, 1),
                              "kernel": info[0].get("architecture") if info else None}), flush=True)

if __name__ == "__main__":
    main()
