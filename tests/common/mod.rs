//! Shared by the integration tests: named tolerances, seeded random inputs,
//! and plain nested-loop f64 references for every fast kernel.
#![allow(dead_code)]

use ndarray::{Array1, Array2, Array4, ArrayView1, ArrayView2, ArrayView4};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Tolerances, in one place. Each is a bound on
/// `max |fast - reference| / max(1, max |reference|)` unless said otherwise.
pub mod tol {
    /// Integer-valued inputs small enough that every f32 partial sum is
    /// exact: the fast path must match bit for bit.
    pub const EXACT: f32 = 0.0;
    /// f32 forward (GEMM, conv) against the f64 reference, relative to the
    /// largest reference value: k up to a few thousand terms of f32 rounding.
    pub const F32_FORWARD: f64 = 1e-5;
    /// Winograd F(4x4, 3x3) forward against the f64 reference, same measure:
    /// the input and output transforms multiply values by up to 8 and the
    /// kernel transform by fractions down to 1/24 before rounding.
    pub const WINOGRAD_FORWARD: f64 = 5e-5;
    /// Analytic f32 gradient against a central finite difference of the f64
    /// reference forward, as ggml's normalised error
    /// |a - n| / max(|a|, |n|, floor), floor below.
    pub const GRAD_REL: f64 = 2e-4;
    /// Finite-difference step on f64 inputs of order 1.
    pub const FD_EPS: f64 = 1e-4;
    /// Gradients smaller than this are compared absolutely.
    pub const GRAD_FLOOR: f64 = 1e-3;
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn rand_vec(rng: &mut ChaCha8Rng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(lo..hi)).collect()
}

pub fn rand4(rng: &mut ChaCha8Rng, d: (usize, usize, usize, usize), lo: f32, hi: f32) -> Array4<f32> {
    Array4::from_shape_vec(d, rand_vec(rng, d.0 * d.1 * d.2 * d.3, lo, hi)).unwrap()
}

pub fn rand2(rng: &mut ChaCha8Rng, d: (usize, usize), lo: f32, hi: f32) -> Array2<f32> {
    Array2::from_shape_vec(d, rand_vec(rng, d.0 * d.1, lo, hi)).unwrap()
}

pub fn rand1(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Array1<f32> {
    Array1::from(rand_vec(rng, n, lo, hi))
}

/// Integer-valued floats in lo..=hi.
pub fn rand_int2(rng: &mut ChaCha8Rng, d: (usize, usize), lo: i32, hi: i32) -> Array2<f32> {
    Array2::from_shape_fn(d, |_| rng.gen_range(lo..=hi) as f32)
}

/// max |a - b| / max(1, max |b|)
pub fn rel_err<'a>(a: impl IntoIterator<Item = &'a f32>, b: impl IntoIterator<Item = &'a f64>) -> f64 {
    let (mut diff, mut scale) = (0.0f64, 1.0f64);
    let (a, b): (Vec<f64>, Vec<f64>) = (
        a.into_iter().map(|&v| v as f64).collect(),
        b.into_iter().copied().collect(),
    );
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    for (x, y) in a.iter().zip(&b) {
        assert!(x.is_finite(), "non-finite value {x}");
        diff = diff.max((x - y).abs());
        scale = scale.max(y.abs());
    }
    diff / scale
}

pub fn to64_4(a: ArrayView4<f32>) -> Array4<f64> {
    a.mapv(|v| v as f64)
}

// ------------------------------------------------------------ references (f64)

/// Naive GEMM: (m, k) x (k, n).
pub fn ref_gemm(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f64> {
    let (m, k) = a.dim();
    let n = b.ncols();
    Array2::from_shape_fn((m, n), |(i, j)| {
        (0..k).map(|p| a[[i, p]] as f64 * b[[p, j]] as f64).sum()
    })
}

/// Direct 3x3 "same" convolution, NHWC, Keras kernel layout, optional ReLU.
pub fn ref_conv(x: &Array4<f64>, w: &Array4<f64>, b: Option<&Array1<f64>>, relu: bool) -> Array4<f64> {
    let (n, h, wd, cin) = x.dim();
    let cout = w.dim().3;
    Array4::from_shape_fn((n, h, wd, cout), |(i, y, xx, co)| {
        let mut s = b.map_or(0.0, |b| b[co]);
        for ky in 0..3 {
            for kx in 0..3 {
                let (iy, ix) = (y as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                    continue;
                }
                for ci in 0..cin {
                    s += x[[i, iy as usize, ix as usize, ci]] * w[[ky, kx, ci, co]];
                }
            }
        }
        if relu {
            s.max(0.0)
        } else {
            s
        }
    })
}

pub fn ref_maxpool(x: &Array4<f64>) -> Array4<f64> {
    let (n, h, w, c) = x.dim();
    Array4::from_shape_fn((n, h / 2, w / 2, c), |(i, y, xx, ch)| {
        let mut m = f64::NEG_INFINITY;
        for dy in 0..2 {
            for dx in 0..2 {
                m = m.max(x[[i, 2 * y + dy, 2 * xx + dx, ch]]);
            }
        }
        m
    })
}

pub fn ref_gap(x: &Array4<f64>) -> Array2<f64> {
    let (n, h, w, c) = x.dim();
    Array2::from_shape_fn((n, c), |(i, ch)| {
        let mut s = 0.0;
        for y in 0..h {
            for xx in 0..w {
                s += x[[i, y, xx, ch]];
            }
        }
        s / (h * w) as f64
    })
}

pub fn ref_dense(x: &Array2<f64>, w: &Array2<f64>, b: &Array1<f64>) -> Array2<f64> {
    x.dot(w) + b
}

pub fn ref_softmax_ce(logits: &Array2<f64>, labels: &[u8]) -> f64 {
    let mut total = 0.0;
    for (row, &t) in logits.rows().into_iter().zip(labels) {
        let mx = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        total += lse - row[t as usize];
    }
    total / labels.len() as f64
}

/// Sum of elementwise products: the scalar "loss" whose gradient with
/// respect to the output is `r`, used to probe backward functions.
pub fn dot4(a: &Array4<f64>, r: &Array4<f64>) -> f64 {
    a.iter().zip(r.iter()).map(|(x, y)| x * y).sum()
}

pub fn dot2(a: &Array2<f64>, r: &Array2<f64>) -> f64 {
    a.iter().zip(r.iter()).map(|(x, y)| x * y).sum()
}

pub fn view1(a: &Array1<f32>) -> ArrayView1<'_, f32> {
    a.view()
}

/// ggml's normalised difference with a floor.
pub fn grad_err(analytic: f64, numeric: f64) -> f64 {
    (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(tol::GRAD_FLOOR)
}

/// `../shared` beside the project (development data, weights, fixtures).
/// Tests that need it carry `#[cfg_attr(not(has_shared), ignore = ...)]`
/// (see build.rs), so they are reported as ignored where it is missing.
pub fn shared() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        dir.join("weights").is_dir() && dir.join("data").is_dir(),
        "{} is missing (run with it beside the project, or `touch build.rs` after removing it)",
        dir.display()
    );
    dir
}

/// The ImageNet base: weights/ (what `vgg16 weights fetch` writes), else
/// ../shared/weights/. Tests that need it carry
/// `#[cfg_attr(not(has_weights), ignore = ...)]` (see build.rs).
pub fn imagenet_weights() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let own = root.join("weights/vgg16_imagenet_notop.npz");
    if own.is_file() {
        own
    } else {
        root.join("../shared/weights/vgg16_imagenet_notop.npz")
    }
}

/// Deterministic He-uniform stand-in for the VGG-16 weights (activations stay
/// of order one to a hundred, like the real ones), for tests that exercise
/// plumbing rather than ImageNet features.
pub fn fake_vgg(seed: u64) -> vgg16_cpu::model::vgg::Vgg16 {
    let mut r = rng(seed);
    vgg16_cpu::model::vgg::Vgg16 {
        convs: vgg16_cpu::model::vgg::convs()
            .map(|(_, _, cin, cout)| {
                let limit = (6.0 / (9 * cin) as f32).sqrt();
                vgg16_cpu::model::vgg::ConvParams {
                    w: rand4(&mut r, (3, 3, cin, cout), -limit, limit),
                    b: rand1(&mut r, cout, -0.01, 0.05),
                }
            })
            .collect(),
    }
}

/// The committed sample (500 train / 100 test records).
pub fn sample_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample")
}

/// Runs the `vgg16` binary from the project root.
pub fn vgg16(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vgg16"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the vgg16 binary runs")
}

/// The ISAs of the direct kernel this CPU can run; each one it cannot is
/// reported SKIPPED for `test` on stderr (never passed silently). The
/// portable kernel always runs.
pub fn isas_or_skip(test: &str) -> Vec<vgg16_cpu::tensor::dispatch::Isa> {
    use vgg16_cpu::tensor::dispatch::{cpu_features, Isa};
    let (run, skip): (Vec<Isa>, Vec<Isa>) = Isa::ALL.into_iter().partition(|i| i.supported());
    for i in skip {
        eprintln!(
            "SKIPPED {test} on {}: this CPU ({}) cannot run that kernel",
            i.name(),
            cpu_features()
        );
    }
    run
}

/// The forward tolerance of a conv path against the f64 reference.
pub fn forward_tol(path: vgg16_cpu::tensor::conv::ConvPath) -> f64 {
    match path {
        vgg16_cpu::tensor::conv::ConvPath::Winograd(_) => tol::WINOGRAD_FORWARD,
        _ => tol::F32_FORWARD,
    }
}

/// Every conv path this CPU can run for an h x w image: im2col, the direct
/// kernel and Winograd on each supported ISA, and tap classes for small
/// images.
pub fn paths_or_skip(test: &str, h: usize, w: usize) -> Vec<vgg16_cpu::tensor::conv::ConvPath> {
    use vgg16_cpu::tensor::conv::{ConvPath, SMALL_SIDE};
    let mut v = vec![ConvPath::Im2col];
    for isa in isas_or_skip(test) {
        v.extend([ConvPath::Direct(isa), ConvPath::Winograd(isa)]);
    }
    if h <= SMALL_SIDE && w <= SMALL_SIDE {
        v.push(ConvPath::TapClasses);
    }
    v
}

/// A run's history without its timings: what must repeat bit for bit.
pub fn history_numbers(h: &[vgg16_cpu::report::history::EpochRecord]) -> Vec<(u8, usize, [u64; 4])> {
    h.iter()
        .map(|r| {
            let v = [r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy];
            (r.stage, r.epoch, v.map(f64::to_bits))
        })
        .collect()
}

/// The seed recipe shrunk for tests: 32 px, stage 1 lr 1e-3 batch 16 for
/// one epoch, stage 2 lr 1e-4 momentum 0.9 batch 16 for `stage2_epochs`,
/// on the first `n_train` / `n_test` records.
pub fn small_recipe(seed: u64, n_train: usize, n_test: usize, stage2_epochs: usize) -> vgg16_cpu::TrainConfig {
    use vgg16_cpu::StageConfig;
    let mut c = vgg16_cpu::TrainConfig::recipe(32, 10);
    c.stage1 = StageConfig::sgd(0.001, 0.0, 16, 1);
    c.stage2 = StageConfig::sgd(1e-4, 0.9, 16, stage2_epochs);
    c.seed = seed;
    c.limit_train = Some(n_train);
    c.limit_test = Some(n_test);
    c
}
