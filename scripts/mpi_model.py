#!/usr/bin/env python3
"""Scaling model of data-parallel stage 2 (docs/mpi.md), from measured steps.

Input: the JSON lines of `vgg16 bench step --threads T --image-size S
--batch 1,2,4,8,16,32,64` on one node (one line per batch size: when
backward hands over each gradient, when it ends, the update). For N nodes
and a global batch G, each node computes G/N images a step (a measured
batch), then the gradients are summed over the nodes in rank order
(train::parallel: all-to-all + all-gather, 2(N-1)/N of each segment in and
out per node, 2(N-1) messages):

  x_k  = 2(N-1)/N * bytes_k / bandwidth + 2(N-1) * latency  (segment k)
  after backward:  T = backward_end + sum_k x_k + update
  overlapped:      f = 0; for k in (head, conv5_3, conv5_2, conv5_1):
                   f = max(f, ready_k) + x_k;   T = max(f, backward_end) + update

Efficiency against one node running the recipe (global batch 64, no
exchange, T1): (G / T) / (N * 64 / T1). "Exchange" efficiency: the step's
compute over the step (what the network costs, the per-node batch given).

Ceiling: the same against one node if a node's G/N images cost exactly
G/(N*64) of the 64-image step (every phase and every gradient's moment
scaled; no fixed cost per step), the exchange overlapped as above: what
no work on small steps can beat, only a faster link or a larger G.

Whole job (with --cache-img-s R, one node's cache-build rate): the cache
build (--cache-images, 60,000 at the recipe) scales perfectly, stage 2
(--stage2-images, 5 epochs x 50,000) at the overlapped efficiency E:
(C/R + S/r) / (C/R + S/(r E)), r = 64 / T1.

usage: scripts/mpi_model.py STEP.jsonl [--latency-us 30] [--global-batch 64,256]
       [--cache-img-s R]
"""
import argparse
import json

p = argparse.ArgumentParser()
p.add_argument("steps")
p.add_argument("--latency-us", type=float, default=30.0)
p.add_argument("--global-batch", default="64,256")
p.add_argument("--nodes", default="2,4,16,64")
p.add_argument("--gbits", default="10,100")
p.add_argument("--cache-img-s", type=float, help="one node's cache-build rate (images/s): adds the whole job")
p.add_argument("--cache-images", type=int, default=60000)
p.add_argument("--stage2-images", type=int, default=250000)
a = p.parse_args()

steps = {}
for line in open(a.steps):
    d = json.loads(line)
    steps[d["batch"]] = d
size = next(iter(steps.values()))["image_size"]
order = ["head", "block5_conv3", "block5_conv2", "block5_conv1"]


def scaled(b):
    """The 64-image step scaled to b images: no fixed cost per step."""
    d = steps[64]
    f = b / 64
    return {
        "backward_end_ms": d["backward_end_ms"] * f,
        "update_ms": d["update_ms"] * f,
        "gradient_floats": d["gradient_floats"],
        "ready_ms": {k: v * f for k, v in d["ready_ms"].items()},
    }


def step_ms(b, n, gbit, overlap, ideal=False):
    d = scaled(b) if ideal else steps[b]
    comp = d["backward_end_ms"] + d["update_ms"]
    if n == 1:
        return comp, comp
    bw = gbit * 1e9 / 8
    x = [
        (2 * (n - 1) / n * (d["gradient_floats"][k] + (2 if k == "head" else 0)) * 4 / bw
         + 2 * (n - 1) * a.latency_us * 1e-6) * 1e3
        for k in order
    ]
    if not overlap:
        return d["backward_end_ms"] + sum(x) + d["update_ms"], comp
    f = 0.0
    for k, xk in zip(order, x):
        f = max(f, d["ready_ms"][k]) + xk
    return max(f, d["backward_end_ms"]) + d["update_ms"], comp


t1 = steps[64]["total_ms"]
print(f"image size {size}, {steps[64]['threads']} threads a node, cpu {steps[64]['cpu']}; "
      f"one node, batch 64: {t1:.0f} ms a step ({64 / t1 * 1e3:.1f} img/s); latency {a.latency_us} us")
for g in map(int, a.global_batch.split(",")):
    print(f"\nglobal batch {g}:\n")
    print("| nodes | images a node | link | step, exchange after backward (ms) | step, overlapped (ms) "
          "| exchange efficiency, after / overlapped | efficiency against one node, after / overlapped "
          "| ceiling, overlapped |" + (" whole job, overlapped |" if a.cache_img_s else ""))
    print("| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if a.cache_img_s else ""))
    for n in map(int, a.nodes.split(",")):
        b = g // n
        if b not in steps or g % n:
            print(f"| {n} | {g / n:g} | | (batch {g / n:g} not measured) | | | |")
            continue
        for gbit in map(float, a.gbits.split(",")):
            ta, comp = step_ms(b, n, gbit, False)
            to, _ = step_ms(b, n, gbit, True)
            ea, eo = comp / ta, comp / to
            sa, so = (g / ta) / (n * 64 / t1), (g / to) / (n * 64 / t1)
            ti, _ = step_ms(b, n, gbit, True, ideal=True)
            si = (g / ti) / (n * 64 / t1)
            row = f"| {n} | {b} | {gbit:g} Gbit/s | {ta:.0f} | {to:.0f} | {ea:.0%} / {eo:.0%} | {sa:.0%} / {so:.0%} | {si:.0%} |"
            if a.cache_img_s:
                cache, stage2 = a.cache_images / a.cache_img_s, a.stage2_images / (64 / t1 * 1e3)
                row += f" {(cache + stage2) / (cache + stage2 / so):.0%} |"
            print(row)
