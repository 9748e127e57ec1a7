#!/usr/bin/env python3
"""ONNX Runtime's time per VGG-16 layer, from its own profiler, to set beside
`VGG16_CONV=direct vgg16 bench conv --batch B --image-size S --threads 2`.

  python3 scripts/ort_layers.py SIZE BATCH [RUNS]

Builds the graph of ../shared/peers/ort_vgg16_bench.py (PEER to override)
from weights/vgg16_imagenet_notop.npz (WEIGHTS to override), runs RUNS + 1
batches with 2 threads, drops the first, and prints each node's fastest run
(ms per batch) and their sum. Needs onnxruntime, onnx, numpy."""
import collections, importlib.util, json, os, sys
import numpy as np, onnxruntime as ort

size, batch = int(sys.argv[1]), int(sys.argv[2])
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
peer_path = os.environ.get("PEER", "../shared/peers/ort_vgg16_bench.py")
spec = importlib.util.spec_from_file_location("peer", peer_path)
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)
so = ort.SessionOptions()
so.intra_op_num_threads = 2
so.enable_profiling = True
model = peer.build(os.environ.get("WEIGHTS", "weights/vgg16_imagenet_notop.npz"))
sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
x = (np.random.default_rng(0).standard_normal((batch, 3, size, size)) * 50).astype(np.float32)
for _ in range(runs + 1):
    sess.run(["gap"], {"x": x})
path = sess.end_profiling()
with open(path) as f:
    events = json.load(f)
os.remove(path)
per = collections.defaultdict(list)
for e in events:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        per[e["name"][: -len("_kernel_time")]].append(e["dur"] / 1000)
total = 0.0
for name, ms in per.items():
    best = min(ms[1:]) if len(ms) > 1 else ms[0]
    total += best
    if best >= 1:
        print(f"{name:32s} {best:8.1f} ms")
print(f"{'total':32s} {total:8.1f} ms")
