//! The workload shapes benchmarks use (shared by `cargo bench` and the
//! `vgg16 bench` command), a small median timer, and the `vgg16 bench`
//! measurements themselves (one JSON object per measured case).

use crate::tensor::conv::{
    conv3x3_backward, conv3x3_forward_path, conv3x3_forward_prepared, forward_flops, ConvAlgo, ConvPath, PreparedKernel,
};
use crate::tensor::dispatch::{cpu_model, Dispatch};
use crate::tensor::gemm::{flops, sgemm_with, Backend};
use ndarray::{Array1, Array2, Array4};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// One GEMM shape from VGG-16's im2col: m = output pixels x batch,
/// k = 9 * Cin, n = Cout.
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub name: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// The im2col GEMM shapes of VGG-16 that the engine issue names, plus a
/// square 2048 for comparison with published BLAS figures.
pub const GEMM_SHAPES: &[GemmShape] = &[
    GemmShape {
        name: "224_b1_block1_conv2",
        m: 50176,
        k: 576,
        n: 64,
    },
    GemmShape {
        name: "224_b1_block3_conv2",
        m: 3136,
        k: 2304,
        n: 256,
    },
    GemmShape {
        name: "224_b1_block4_conv2",
        m: 784,
        k: 4608,
        n: 512,
    },
    GemmShape {
        name: "224_b1_block5_conv2",
        m: 196,
        k: 4608,
        n: 512,
    },
    GemmShape {
        name: "32_b64_block1_conv2",
        m: 65536,
        k: 576,
        n: 64,
    },
    GemmShape {
        name: "32_b64_block4_conv2",
        m: 1024,
        k: 4608,
        n: 512,
    },
    GemmShape {
        name: "32_b64_block5_conv2",
        m: 256,
        k: 4608,
        n: 512,
    },
    GemmShape {
        name: "square_2048",
        m: 2048,
        k: 2048,
        n: 2048,
    },
];

/// VGG-16's 13 conv layers: (name, Cin, Cout, spatial divisor of the input
/// size: 1 for block1, 2 for block2, ... 16 for block5).
pub const VGG_CONVS: &[(&str, usize, usize, usize)] = &[
    ("block1_conv1", 3, 64, 1),
    ("block1_conv2", 64, 64, 1),
    ("block2_conv1", 64, 128, 2),
    ("block2_conv2", 128, 128, 2),
    ("block3_conv1", 128, 256, 4),
    ("block3_conv2", 256, 256, 4),
    ("block3_conv3", 256, 256, 4),
    ("block4_conv1", 256, 512, 8),
    ("block4_conv2", 512, 512, 8),
    ("block4_conv3", 512, 512, 8),
    ("block5_conv1", 512, 512, 16),
    ("block5_conv2", 512, 512, 16),
    ("block5_conv3", 512, 512, 16),
];

/// Runs `f` once to warm up, then until both `min_runs` runs and `min_time`
/// have passed; returns the median run time in seconds.
pub fn median_seconds(min_runs: usize, min_time: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_runs.max(1) || start.elapsed() < min_time {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// `vgg16 bench gemm`: SGEMM GFLOP/s at `shapes` (of [`GEMM_SHAPES`]) for
/// each backend in `backends`; `each` gets one JSON object per shape and backend.
pub fn bench_gemm(backends: &[Backend], shapes: &[&GemmShape], min_time: Duration, mut each: impl FnMut(Value)) {
    let threads = rayon::current_num_threads();
    let cpu = cpu_model();
    for s in shapes {
        let a = Array2::from_shape_fn((s.m, s.k), |(i, j)| ((i * 7 + j * 3) % 17) as f32 * 0.01);
        let b = Array2::from_shape_fn((s.k, s.n), |(i, j)| ((i * 5 + j * 11) % 13) as f32 * 0.01);
        let mut c = Array2::<f32>::zeros((s.m, s.n));
        for &backend in backends {
            let sec = median_seconds(3, min_time, || {
                sgemm_with(backend, a.view(), b.view(), c.view_mut(), false)
            });
            let gf = flops(s.m, s.k, s.n) / sec / 1e9;
            each(
                json!({"name": s.name, "m": s.m, "k": s.k, "n": s.n, "threads": threads, "cpu": cpu,
                       "backend": backend.name(), "gflops": (gf * 10.0).round() / 10.0}),
            );
        }
    }
}

fn filled(d: (usize, usize, usize, usize), scale: f32) -> Array4<f32> {
    Array4::from_shape_fn(d, |(a, b, c, e)| {
        (((a * 31 + b * 17 + c * 7 + e * 3) % 23) as f32 - 11.0) * scale
    })
}

/// `vgg16 bench conv`: each VGG-16 conv layer's forward at input size
/// `size` and batch `batch` (the dispatch's path, and im2col and direct
/// beside it where it picks another), against the bare GEMM of the same
/// shape; then block5's backward. `each` gets one JSON object per line.
pub fn bench_conv(size: usize, batch: usize, min_time: Duration, mut each: impl FnMut(Value)) -> crate::Result<()> {
    if !size.is_multiple_of(16) || size == 0 || batch == 0 {
        crate::config_bail!("--image-size must be a positive multiple of 16 and --batch positive");
    }
    let threads = rayon::current_num_threads();
    let (cpu, isa) = (cpu_model(), Dispatch::global().isa.name());
    for &(name, cin, cout, div) in VGG_CONVS {
        let hw = size / div;
        let x = filled((batch, hw, hw, cin), 0.05);
        let w = filled((3, 3, cin, cout), 0.01);
        let b = Array1::<f32>::zeros(cout);
        let m = batch * hw * hw;
        let mut out = Array2::<f32>::zeros((m, cout));
        // As a forward pass over many batches runs them: the kernel packed
        // or transformed once (`Vgg16::prepare`), outside the timing.
        let mut time_path = |path| {
            let prepared = PreparedKernel::new(path, w.view());
            median_seconds(3, min_time, || match &prepared {
                Some(k) => drop(conv3x3_forward_prepared(x.view(), k, Some(b.view()), true)),
                None => conv3x3_forward_path(path, x.view(), w.view(), Some(b.view()), true, out.view_mut()),
            })
        };
        let d = Dispatch::global();
        let path = d.path(ConvAlgo::Auto, hw, hw, cin);
        let sec = time_path(path);
        // The other paths too, side by side, where Auto picks another.
        let big = path != ConvPath::TapClasses;
        let im2col = (big && path != ConvPath::Im2col).then(|| time_path(ConvPath::Im2col));
        let direct = (big && path != ConvPath::Direct(d.isa)).then(|| time_path(ConvPath::Direct(d.isa)));
        let gf = forward_flops(batch, hw, hw, cin, cout) / sec / 1e9;
        // The bare GEMM of the same shape, measured in the same run.
        let a = Array2::from_shape_fn((m, 9 * cin), |(i, j)| ((i + j) % 7) as f32 * 0.01);
        let w2 = w
            .view()
            .into_shape_with_order((9 * cin, cout))
            .expect("contiguous")
            .to_owned();
        let mut c = Array2::<f32>::zeros((m, cout));
        let gsec = median_seconds(3, min_time, || {
            sgemm_with(Backend::auto(), a.view(), w2.view(), c.view_mut(), false)
        });
        let ggf = flops(m, 9 * cin, cout) / gsec / 1e9;
        each(
            json!({"layer": name, "pass": "forward", "size": hw, "batch": batch, "threads": threads,
                   "cpu": cpu, "isa": isa, "algo": path.name(),
                   "gflops": (gf * 10.0).round() / 10.0, "gemm_gflops": (ggf * 10.0).round() / 10.0,
                   "im2col_gflops": im2col.map(|t| (forward_flops(batch, hw, hw, cin, cout) / t / 1e8).round() / 10.0),
                   "direct_gflops": direct.map(|t| (forward_flops(batch, hw, hw, cin, cout) / t / 1e8).round() / 10.0),
                   "ratio": (gf / ggf * 100.0).round() / 100.0, "ms": (sec * 1e4).round() / 10.0}),
        );
    }
    // block5 backward (dW + dX) at size/16, against the two bare GEMMs.
    let hw = size / 16;
    let (cin, cout) = (512, 512);
    let x = filled((batch, hw, hw, cin), 0.05);
    let w = filled((3, 3, cin, cout), 0.01);
    let dz = filled((batch, hw, hw, cout), 0.02);
    let sec = median_seconds(3, min_time, || {
        conv3x3_backward(x.view(), w.view(), dz.view(), true);
    });
    let m = batch * hw * hw;
    let gf = 2.0 * forward_flops(batch, hw, hw, cin, cout) / sec / 1e9;
    let a = Array2::from_shape_fn((m, 9 * cin), |(i, j)| ((i + j) % 7) as f32 * 0.01);
    let d = Array2::from_shape_fn((m, cout), |(i, j)| ((i + 2 * j) % 5) as f32 * 0.01);
    let w2 = Array2::from_shape_fn((9 * cout, cin), |(i, j)| ((i + j) % 3) as f32 * 0.01);
    let mut dw = Array2::<f32>::zeros((9 * cin, cout));
    let mut dx = Array2::<f32>::zeros((m, cin));
    let gsec = median_seconds(3, min_time, || {
        sgemm_with(Backend::auto(), a.t(), d.view(), dw.view_mut(), false);
        sgemm_with(Backend::auto(), a.view(), w2.view(), dx.view_mut(), false);
    });
    let ggf = 2.0 * flops(m, 9 * cin, cout) / gsec / 1e9;
    each(
        json!({"layer": "block5_conv2", "pass": "backward_dw_dx", "size": hw, "batch": batch, "threads": threads,
               "cpu": cpu, "isa": isa, "algo": Dispatch::global().path(ConvAlgo::Auto, hw, hw, cin).name(),
               "gflops": (gf * 10.0).round() / 10.0, "gemm_gflops": (ggf * 10.0).round() / 10.0,
               "ratio": (gf / ggf * 100.0).round() / 100.0, "ms": (sec * 1e4).round() / 10.0}),
    );
    Ok(())
}

/// The input pipeline alone: records `0..n` of `data` turned into (B, S, S,
/// 3) network input `batch` at a time (for a folder: read, decode, EXIF,
/// resize, preprocess, in parallel), timed once end to end. Set beside the
/// cache build's img/s, it says what share of a build the input costs.
pub fn bench_input(data: &crate::data::Dataset, n: usize, size: usize, batch: usize) -> crate::Result<Value> {
    let n = n.min(data.len());
    let idx: Vec<usize> = (0..n).collect();
    let t = std::time::Instant::now();
    let mut checksum = 0.0f64;
    for chunk in idx.chunks(batch.max(1)) {
        let x = data.input(chunk, size)?;
        checksum += x.iter().take(16).map(|&v| v as f64).sum::<f64>();
    }
    let secs = t.elapsed().as_secs_f64();
    let files = match &data.records {
        crate::data::Records::Files(f) => f.files[..n]
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum::<u64>(),
        crate::data::Records::Cifar(_) => (n * crate::data::cifar::IMAGE_BYTES) as u64,
    };
    Ok(
        json!({"bench": "input", "dataset": data.origin, "split": data.split.name(), "images": n,
              "image_size": size, "batch": batch, "resize": data.resize().name(),
              "threads": rayon::current_num_threads(), "cpu": cpu_model(),
              "seconds": secs, "images_per_second": n as f64 / secs,
              "mean_file_bytes": files as f64 / n.max(1) as f64, "checksum": checksum}),
    )
}

/// `vgg16 bench step`: one stage-2 training step (block5 forward, the
/// 10-class head and its loss, backward, the SGD update of block5 + head)
/// at input size `size` and each batch in `batches`, timed by phase.
/// `ready_ms` says when backward hands over each gradient (the head's,
/// then conv5_3's, conv5_2's, conv5_1's), measured from the step's start:
/// the schedule the overlapped gradient exchange of data parallelism
/// works with (docs/mpi.md). Weights and inputs are synthetic (timing does
/// not depend on their values).
pub fn bench_step(
    size: usize,
    batches: &[usize],
    min_time: Duration,
    mut each: impl FnMut(Value),
) -> crate::Result<()> {
    use crate::model::vgg::ConvParams;
    use crate::model::{block5_backward_each, block5_forward, head_backward, head_forward, Block5Kernels, Head};
    use crate::tensor::ops::softmax_cross_entropy;
    use crate::train::optim::sgd_momentum_step;
    use rand::SeedableRng;
    crate::model::vgg::check_image_size(size)?;
    let s = size / 16;
    let threads = rayon::current_num_threads();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let block5: Vec<ConvParams> = (0..3)
        .map(|i| ConvParams {
            w: filled((3, 3, 512, 512), 2e-3 + i as f32 * 1e-4),
            b: Array1::from_elem(512, 0.01),
        })
        .collect();
    let head = Head::new(&mut rng, None, 0.0, 10);
    let params = block5.iter().map(|p| p.w.len() + p.b.len()).sum::<usize>()
        + head.tensors().iter().map(|(_, t, _)| t.len()).sum::<usize>();
    for &batch in batches {
        let x4 = filled((batch, s, s, 512), 0.05);
        let y: Vec<u8> = (0..batch).map(|i| (i % 10) as u8).collect();
        let (mut w, mut v) = (vec![0.01f32; params], vec![0f32; params]);
        let mut runs: Vec<[f64; 7]> = Vec::new();
        let start = Instant::now();
        let mut first = true;
        let mut kernels = Block5Kernels::new();
        while runs.len() < 3 || start.elapsed() < min_time {
            // As in training, every step prepares block5's kernels anew
            // (into the buffers of the step before).
            kernels.weights_changed();
            let t0 = Instant::now();
            let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
            let (g, acts5) = block5_forward(&block5, x4.clone(), &mut kernels);
            let (logits, acts) = head_forward(&head, g.view(), None);
            let (_, dlogits) = softmax_cross_entropy(logits.view(), &y);
            let forward = ms(Instant::now());
            let (dg, gh) = head_backward(&head, &acts, dlogits.view());
            let head_ready = ms(Instant::now());
            let mut ready = [0f64; 3];
            let grads = block5_backward_each(&block5, &acts5, dg.view(), &kernels, &mut |i, _| {
                ready[2 - i] = ms(Instant::now())
            });
            let backward = ms(Instant::now());
            // The update: one SGD step over as many floats as block5 + head
            // (the copy into one buffer, which training does not make, is
            // left out of the time).
            let flat: Vec<f32> = gh
                .tensors()
                .iter()
                .flat_map(|(_, t, _)| t.iter().copied())
                .chain(grads.iter().flat_map(|g| g.dw.iter().chain(g.db.iter()).copied()))
                .collect();
            let tu = Instant::now();
            sgd_momentum_step(&mut w, &mut v, &flat, 1e-4, 0.9);
            let total = backward + tu.elapsed().as_secs_f64() * 1e3;
            if first {
                first = false; // warm-up: kernels prepared, buffers grown
                continue;
            }
            runs.push([forward, head_ready, ready[0], ready[1], ready[2], backward, total]);
        }
        let median = |k: usize| {
            let mut c: Vec<f64> = runs.iter().map(|r| r[k]).collect();
            c.sort_by(f64::total_cmp);
            c[c.len() / 2]
        };
        let total = median(6);
        each(json!({
            "bench": "step", "image_size": size, "batch": batch, "threads": threads,
            "forward_ms": median(0),
            "ready_ms": {"head": median(1), "block5_conv3": median(2), "block5_conv2": median(3), "block5_conv1": median(4)},
            "backward_end_ms": median(5),
            "total_ms": total,
            "update_ms": total - median(5),
            "images_per_s": batch as f64 / total * 1e3,
            "gradient_floats": {"head": head.tensors().iter().map(|(_, t, _)| t.len()).sum::<usize>(),
                                "block5_conv3": block5[2].w.len() + 512, "block5_conv2": block5[1].w.len() + 512,
                                "block5_conv1": block5[0].w.len() + 512},
            "runs": runs.len(),
            "dispatch": Dispatch::global().describe(),
            "cpu": cpu_model(),
        }));
    }
    Ok(())
}
