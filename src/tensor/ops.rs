//! The layers around the convolutions: ReLU, 2x2/2 max-pool, global average
//! pool, dense, softmax cross-entropy. Each is a plain `*_forward` /
//! `*_backward` pair over NHWC (or (batch, features)) arrays; shapes are
//! written beside every argument.

use crate::tensor::gemm::sgemm;
use ndarray::{Array1, Array2, Array4, ArrayView1, ArrayView2, ArrayView4, Axis, Zip};
use rayon::prelude::*;

// ---------------------------------------------------------------- ReLU

/// ReLU backward from the layer's output: dZ = dY where Y > 0, else 0.
/// `y` and `dy` share a shape (any rank-4 NHWC tensor).
pub fn relu_backward(y: ArrayView4<f32>, dy: ArrayView4<f32>) -> Array4<f32> {
    assert_eq!(y.dim(), dy.dim(), "relu_backward: y and dy differ in shape");
    let mut dz = dy.to_owned();
    Zip::from(&mut dz).and(&y).par_for_each(|d, &v| {
        if v <= 0.0 {
            *d = 0.0;
        }
    });
    dz
}

// ---------------------------------------------------------------- max-pool

/// 2x2, stride 2 max-pool (Keras "valid": odd trailing rows/columns dropped).
/// Returns y (N, H/2, W/2, C) and, for each output, which of the four inputs
/// won: 0 = (0,0), 1 = (0,1), 2 = (1,0), 3 = (1,1); the first wins a tie.
pub fn maxpool2x2_forward(x: ArrayView4<f32>) -> (Array4<f32>, Array4<u8>) {
    let (n, h, w, c) = x.dim();
    let (ho, wo) = (h / 2, w / 2);
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let mut y = Array4::<f32>::zeros((n, ho, wo, c));
    let mut arg = Array4::<u8>::zeros((n, ho, wo, c));
    if y.is_empty() {
        return (y, arg);
    }
    let ys = y.as_slice_mut().expect("fresh");
    let args = arg.as_slice_mut().expect("fresh");
    // One output row (n, oy) per job; per output pixel, the four input
    // pixels' channel runs are compared lane by lane.
    ys.par_chunks_mut(wo * c)
        .zip(args.par_chunks_mut(wo * c))
        .enumerate()
        .for_each(|(row, (yr, ar))| {
            let (img, oy) = (row / ho, row % ho);
            let at = |dy: usize, ox: usize, dx: usize| {
                let o = ((img * h + 2 * oy + dy) * w + 2 * ox + dx) * c;
                &xs[o..o + c]
            };
            for ox in 0..wo {
                let cand = [at(0, ox, 0), at(0, ox, 1), at(1, ox, 0), at(1, ox, 1)];
                let yo = &mut yr[ox * c..(ox + 1) * c];
                let ao = &mut ar[ox * c..(ox + 1) * c];
                yo.copy_from_slice(cand[0]);
                ao.fill(0);
                for (k, cv) in cand.iter().enumerate().skip(1) {
                    for ((y, a), &v) in yo.iter_mut().zip(ao.iter_mut()).zip(cv.iter()) {
                        if v > *y {
                            *y = v;
                            *a = k as u8;
                        }
                    }
                }
            }
        });
    (y, arg)
}

/// Max-pool 2x2 for inference: the values of [`maxpool2x2_forward`] (same
/// comparisons, so the same result, NaN included) without the argmax,
/// in a loop the compiler vectorises.
pub fn maxpool2x2_infer(x: ArrayView4<f32>) -> Array4<f32> {
    let (n, h, w, c) = x.dim();
    let mut y = Array4::<f32>::uninit((n, h / 2, w / 2, c));
    maxpool_rows(x, y.as_slice_mut().expect("fresh"));
    // SAFETY: maxpool_rows writes every value of y.
    unsafe { y.assume_init() }
}

/// [`maxpool2x2_infer`] into `out`, the (N, H/2, W/2, C) output as a flat
/// slice, which is overwritten (never read).
pub fn maxpool2x2_infer_into(x: ArrayView4<f32>, out: &mut [f32]) {
    // SAFETY: maxpool_rows only writes initialised values through it.
    maxpool_rows(x, unsafe {
        &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>])
    });
}

/// The 2x2 max of `x` (N, H, W, C) into every value of `ys` (N, H/2, W/2, C).
fn maxpool_rows(x: ArrayView4<f32>, ys: &mut [std::mem::MaybeUninit<f32>]) {
    let (n, h, w, c) = x.dim();
    let (ho, wo) = (h / 2, w / 2);
    assert_eq!(
        ys.len(),
        n * ho * wo * c,
        "maxpool2x2: output holds {} floats, expected {n}x{ho}x{wo}x{c}",
        ys.len()
    );
    if ys.is_empty() {
        return;
    }
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    ys.par_chunks_mut(wo * c).enumerate().for_each(|(row, yr)| {
        let (img, oy) = (row / ho, row % ho);
        let top = &xs[(img * h + 2 * oy) * w * c..][..w * c];
        let bottom = &xs[(img * h + 2 * oy + 1) * w * c..][..w * c];
        for (ox, yo) in yr.chunks_exact_mut(c).enumerate() {
            let o = 2 * ox * c;
            let (a, b) = (&top[o..o + c], &top[o + c..o + 2 * c]);
            let (d0, d1) = (&bottom[o..o + c], &bottom[o + c..o + 2 * c]);
            for i in 0..c {
                let mut m = a[i];
                for v in [b[i], d0[i], d1[i]] {
                    m = if v > m { v } else { m };
                }
                yo[i].write(m);
            }
        }
    });
}

/// Max-pool backward: routes each dY to the input that won. `input_dim` is
/// the forward input's (N, H, W, C).
pub fn maxpool2x2_backward(
    dy: ArrayView4<f32>,
    arg: ArrayView4<u8>,
    input_dim: (usize, usize, usize, usize),
) -> Array4<f32> {
    let (n, h, w, c) = input_dim;
    let (ho, wo) = (h / 2, w / 2);
    assert_eq!(dy.dim(), (n, ho, wo, c), "maxpool2x2_backward: dy shape");
    assert_eq!(arg.dim(), dy.dim(), "maxpool2x2_backward: argmax shape");
    let mut dx = Array4::<f32>::zeros((n, h, w, c));
    if dy.is_empty() {
        return dx;
    }
    let dy = dy.as_standard_layout();
    let arg = arg.as_standard_layout();
    let (dys, args) = (dy.as_slice().expect("std"), arg.as_slice().expect("std"));
    // One pair of input rows (n, 2*oy, 2*oy+1) per job; rows past 2*ho stay 0.
    let dxs = dx.as_slice_mut().expect("fresh");
    dxs.par_chunks_mut(h * w * c).enumerate().for_each(|(img, dimg)| {
        for oy in 0..ho {
            for ox in 0..wo {
                for ch in 0..c {
                    let o = ((img * ho + oy) * wo + ox) * c + ch;
                    let a = args[o] as usize;
                    let (iy, ix) = (2 * oy + a / 2, 2 * ox + a % 2);
                    dimg[(iy * w + ix) * c + ch] = dys[o];
                }
            }
        }
    });
    dx
}

// ---------------------------------------------------------------- global average pool

/// (N, H, W, C) -> (N, C): the mean over height and width.
pub fn gap_forward(x: ArrayView4<f32>) -> Array2<f32> {
    let (n, h, w, c) = x.dim();
    let mut y = Array2::<f32>::zeros((n, c));
    let inv = 1.0 / (h * w).max(1) as f32;
    y.axis_iter_mut(Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(i, mut yr)| {
            for row in x.index_axis(Axis(0), i).outer_iter() {
                for px in row.outer_iter() {
                    yr += &px;
                }
            }
            yr *= inv;
        });
    y
}

/// GAP backward: every input pixel gets dY / (H*W).
pub fn gap_backward(dy: ArrayView2<f32>, h: usize, w: usize) -> Array4<f32> {
    let (n, c) = dy.dim();
    let inv = 1.0 / (h * w).max(1) as f32;
    Array4::from_shape_fn((n, h, w, c), |(i, _, _, ch)| dy[[i, ch]] * inv)
}

// ---------------------------------------------------------------- dense

/// y (B, O) = x (B, I) x w (I, O) + b (O).
pub fn dense_forward(x: ArrayView2<f32>, w: ArrayView2<f32>, b: ArrayView1<f32>) -> Array2<f32> {
    let (bsz, i) = x.dim();
    let (wi, o) = w.dim();
    assert_eq!(i, wi, "dense_forward: input has {i} features, weight expects {wi}");
    assert_eq!(b.len(), o, "dense_forward: bias length");
    let mut y = Array2::<f32>::zeros((bsz, o));
    sgemm(x, w, y.view_mut(), false);
    y += &b;
    y
}

/// Dense backward: returns (dx (B, I), dw (I, O), db (O)).
pub fn dense_backward(
    x: ArrayView2<f32>,
    w: ArrayView2<f32>,
    dy: ArrayView2<f32>,
) -> (Array2<f32>, Array2<f32>, Array1<f32>) {
    let (bsz, i) = x.dim();
    let o = w.ncols();
    assert_eq!(dy.dim(), (bsz, o), "dense_backward: dy shape");
    let mut dx = Array2::<f32>::zeros((bsz, i));
    let mut dw = Array2::<f32>::zeros((i, o));
    // (B, I) = (B, O) x (O, I)
    sgemm(dy, w.t(), dx.view_mut(), false);
    // (I, O) = (I, B) x (B, O)
    sgemm(x.t(), dy, dw.view_mut(), false);
    let db = dy.sum_axis(Axis(0));
    (dx, dw, db)
}

// ---------------------------------------------------------------- softmax cross-entropy

/// Row-wise softmax, max-subtracted (stable for any logits).
pub fn softmax(logits: ArrayView2<f32>) -> Array2<f32> {
    let mut p = logits.to_owned();
    for mut row in p.rows_mut() {
        let mx = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - mx).exp());
        let s = row.sum();
        row /= s;
    }
    p
}

/// The recipe's loss. Keras 3 computes a softmax head's cross-entropy from
/// the logits the softmax layer keeps (`_keras_logits`), not from clipped
/// probabilities; this does the same. (Checked against the Keras
/// figures: clipping at 1e-7 caps a sample's loss near 16.1, yet Keras
/// reports a mean stage-1 test loss of 12.35 at 54.6% accuracy; a clipped
/// variant we tried gave losses near 6 and different accuracies.)
///
/// Mean softmax cross-entropy over the batch from integer labels, and its
/// gradient at the logits: (softmax - onehot) / B. Per-sample losses use
/// log-sum-exp, so they are finite for any finite logits.
pub fn softmax_cross_entropy(logits: ArrayView2<f32>, labels: &[u8]) -> (f32, Array2<f32>) {
    let (bsz, k) = logits.dim();
    assert_eq!(
        labels.len(),
        bsz,
        "softmax_cross_entropy: {} labels for {bsz} rows",
        labels.len()
    );
    let mut grad = Array2::<f32>::zeros((bsz, k));
    let mut total = 0.0f64;
    for (i, row) in logits.rows().into_iter().enumerate() {
        let t = labels[i] as usize;
        assert!(t < k, "softmax_cross_entropy: label {t} out of range 0..{k}");
        let mx = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f64 = row.iter().map(|&v| ((v - mx) as f64).exp()).sum();
        let lse = mx as f64 + sum.ln();
        total += lse - row[t] as f64;
        let mut g = grad.row_mut(i);
        for j in 0..k {
            g[j] = ((((row[j] - mx) as f64).exp() / sum) as f32) / bsz as f32;
        }
        g[t] -= 1.0 / bsz as f32;
    }
    ((total / bsz.max(1) as f64) as f32, grad)
}

/// [`softmax_cross_entropy`] against smoothed targets: class t gets
/// `1 - eps + eps/K`, every other `eps/K`. Loss = mean over rows of
/// `lse(x) - sum_j target_j x_j`; gradient (softmax - target) / B. With
/// eps = 0 it is the plain loss (the seed recipe calls that one).
pub fn softmax_cross_entropy_smoothed(logits: ArrayView2<f32>, labels: &[u8], eps: f32) -> (f32, Array2<f32>) {
    let (bsz, k) = logits.dim();
    assert_eq!(
        labels.len(),
        bsz,
        "softmax_cross_entropy_smoothed: {} labels for {bsz} rows",
        labels.len()
    );
    let off = eps as f64 / k as f64;
    let on = 1.0 - eps as f64 + off;
    let mut grad = Array2::<f32>::zeros((bsz, k));
    let mut total = 0.0f64;
    for (i, row) in logits.rows().into_iter().enumerate() {
        let t = labels[i] as usize;
        assert!(t < k, "softmax_cross_entropy_smoothed: label {t} out of range 0..{k}");
        let mx = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f64 = row.iter().map(|&v| ((v - mx) as f64).exp()).sum();
        let lse = mx as f64 + sum.ln();
        let mut g = grad.row_mut(i);
        for j in 0..k {
            let target = if j == t { on } else { off };
            total += target * (lse - row[j] as f64);
            g[j] = ((((row[j] - mx) as f64).exp() / sum - target) / bsz as f64) as f32;
        }
    }
    ((total / bsz.max(1) as f64) as f32, grad)
}

/// Per-sample cross-entropy (for evaluation: loss without the gradient).
pub fn cross_entropy_per_sample(logits: ArrayView2<f32>, labels: &[u8]) -> Array1<f32> {
    Array1::from_iter(logits.rows().into_iter().zip(labels).map(|(row, &t)| {
        let mx = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f64 = row.iter().map(|&v| ((v - mx) as f64).exp()).sum();
        (mx as f64 + sum.ln() - row[t as usize] as f64) as f32
    }))
}

/// Index of the largest value (the first on ties): the predicted class.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
