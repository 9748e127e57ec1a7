//! Central finite-difference checks of every backward function.
//!
//! The analytic gradient comes from our f32 backward; the numeric one from
//! central differences of the f64 reference forward (tests/common), so f32
//! rounding does not drown the difference quotient. Probed scalar:
//! L = sum(out * R) for a fixed random R, so dL/dout = R. Inputs are kept
//! away from ReLU kinks (pre-activations with |z| < margin are resampled) and
//! max-pool ties (distinct, well-separated values).

mod common;
use common::*;
use ndarray::{Array1, Array2, Array4};
use rand::Rng;
use vgg16_cpu::tensor::conv::{conv3x3_backward, conv3x3_forward};
use vgg16_cpu::tensor::ops::*;

/// Elements sampled per tensor.
const SAMPLES: usize = 24;

fn assert_grad(what: &str, analytic: f64, numeric: f64) {
    let e = grad_err(analytic, numeric);
    assert!(
        e <= tol::GRAD_REL,
        "{what}: analytic {analytic} vs numeric {numeric} (err {e})"
    );
}

/// Central difference of f at x[idx] for a 4-d f64 tensor.
fn fd4(x: &Array4<f64>, idx: (usize, usize, usize, usize), f: &dyn Fn(&Array4<f64>) -> f64) -> f64 {
    let (mut p, mut m) = (x.clone(), x.clone());
    p[idx] += tol::FD_EPS;
    m[idx] -= tol::FD_EPS;
    (f(&p) - f(&m)) / (2.0 * tol::FD_EPS)
}

fn fd2(x: &Array2<f64>, idx: (usize, usize), f: &dyn Fn(&Array2<f64>) -> f64) -> f64 {
    let (mut p, mut m) = (x.clone(), x.clone());
    p[idx] += tol::FD_EPS;
    m[idx] -= tol::FD_EPS;
    (f(&p) - f(&m)) / (2.0 * tol::FD_EPS)
}

fn fd1(x: &Array1<f64>, i: usize, f: &dyn Fn(&Array1<f64>) -> f64) -> f64 {
    let (mut p, mut m) = (x.clone(), x.clone());
    p[i] += tol::FD_EPS;
    m[i] -= tol::FD_EPS;
    (f(&p) - f(&m)) / (2.0 * tol::FD_EPS)
}

fn sample4(r: &mut impl Rng, d: (usize, usize, usize, usize)) -> (usize, usize, usize, usize) {
    (
        r.gen_range(0..d.0),
        r.gen_range(0..d.1),
        r.gen_range(0..d.2),
        r.gen_range(0..d.3),
    )
}

/// Conv (with bias and ReLU) dW, db, dX; the ReLU is differentiated by
/// relu_backward, as the network does.
#[test]
fn conv_backward_matches_finite_differences() {
    // On AVX2/AVX-512 the dispatch sends (2, 14, 14) and (32, 4, 4) with 16
    // channels to Winograd (32 tiles: dW's and dX's kernel transforms pay),
    // (8, 4, 4) to tap classes (8 tiles do not).
    for (case, &(n, h, w, cin, cout)) in [
        (2, 5, 4, 3, 4),
        (1, 7, 7, 8, 6),
        (3, 2, 2, 5, 3),
        (2, 14, 14, 16, 16),
        (32, 4, 4, 16, 16),
        (8, 4, 4, 16, 16),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(500 + case as u64);
        let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
        let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
        let mut b = rand1(&mut r, cout, -0.3, 0.3);
        // Keep pre-activations away from the ReLU kink: nudge biases until
        // no |z| < margin (a perturbation of FD_EPS cannot cross zero then).
        let margin = 1e-2;
        for _ in 0..200 {
            let z = conv3x3_forward(x.view(), k.view(), Some(b.view()), false);
            let near: Vec<usize> = z
                .indexed_iter()
                .filter(|(_, v)| v.abs() < margin)
                .map(|((_, _, _, c), _)| c)
                .collect();
            if near.is_empty() {
                break;
            }
            for c in near {
                b[c] += r.gen_range(0.02..0.05);
            }
        }
        let y = conv3x3_forward(x.view(), k.view(), Some(b.view()), true);
        let rr = rand4(&mut r, y.dim(), -1.0, 1.0);
        let dz = relu_backward(y.view(), rr.view());
        let g = conv3x3_backward(x.view(), k.view(), dz.view(), true);
        let dx = g.dx.as_ref().unwrap();

        let (x64, k64, b64, r64) = (
            to64_4(x.view()),
            to64_4(k.view()),
            b.mapv(|v| v as f64),
            to64_4(rr.view()),
        );
        let loss = |x: &Array4<f64>, k: &Array4<f64>, b: &Array1<f64>| dot4(&ref_conv(x, k, Some(b), true), &r64);
        for _ in 0..SAMPLES {
            let i = sample4(&mut r, k.dim());
            assert_grad(
                &format!("case {case} dW{i:?}"),
                g.dw[i] as f64,
                fd4(&k64, i, &|k| loss(&x64, k, &b64)),
            );
            let i = sample4(&mut r, x.dim());
            assert_grad(
                &format!("case {case} dX{i:?}"),
                dx[i] as f64,
                fd4(&x64, i, &|x| loss(x, &k64, &b64)),
            );
            let c = r.gen_range(0..cout);
            assert_grad(
                &format!("case {case} db[{c}]"),
                g.db[c] as f64,
                fd1(&b64, c, &|b| loss(&x64, &k64, b)),
            );
        }
        // need_dx = false gives the same dW/db and no dX.
        let g2 = conv3x3_backward(x.view(), k.view(), dz.view(), false);
        assert!(g2.dx.is_none());
        assert_eq!(g2.dw, g.dw);
        assert_eq!(g2.db, g.db);
    }
}

#[test]
fn maxpool_backward_matches_finite_differences() {
    let mut r = rng(600);
    // Distinct values 0.1 apart, shuffled: no ties within FD_EPS.
    let d = (2, 6, 5, 3); // odd width: the last column is dropped
    let count = d.0 * d.1 * d.2 * d.3;
    let mut vals: Vec<f32> = (0..count).map(|i| i as f32 * 0.1 - 5.0).collect();
    use rand::seq::SliceRandom;
    vals.shuffle(&mut r);
    let x = Array4::from_shape_vec(d, vals).unwrap();
    let (y, arg) = maxpool2x2_forward(x.view());
    let x64 = to64_4(x.view());
    assert!(
        rel_err(y.iter(), ref_maxpool(&x64).iter()) == 0.0,
        "maxpool forward differs"
    );
    let rr = rand4(&mut r, y.dim(), -1.0, 1.0);
    let dx = maxpool2x2_backward(rr.view(), arg.view(), d);
    let r64 = to64_4(rr.view());
    for i in ndarray::indices(d) {
        assert_grad(
            &format!("maxpool dX{i:?}"),
            dx[i] as f64,
            fd4(&x64, i, &|x| dot4(&ref_maxpool(x), &r64)),
        );
    }
}

#[test]
fn gap_backward_matches_finite_differences() {
    let mut r = rng(700);
    let x = rand4(&mut r, (3, 4, 5, 6), -1.0, 1.0);
    let y = gap_forward(x.view());
    let x64 = to64_4(x.view());
    assert!(rel_err(y.iter(), ref_gap(&x64).iter()) <= tol::F32_FORWARD);
    let rr = rand2(&mut r, y.dim(), -1.0, 1.0);
    let dx = gap_backward(rr.view(), 4, 5);
    let r64 = rr.mapv(|v| v as f64);
    for _ in 0..SAMPLES {
        let i = sample4(&mut r, x.dim());
        assert_grad(
            &format!("gap dX{i:?}"),
            dx[i] as f64,
            fd4(&x64, i, &|x| dot2(&ref_gap(x), &r64)),
        );
    }
}

#[test]
fn dense_backward_matches_finite_differences() {
    let mut r = rng(800);
    let (bsz, i_n, o_n) = (5, 37, 10);
    let x = rand2(&mut r, (bsz, i_n), -1.0, 1.0);
    let w = rand2(&mut r, (i_n, o_n), -0.5, 0.5);
    let b = rand1(&mut r, o_n, -0.5, 0.5);
    let y = dense_forward(x.view(), w.view(), b.view());
    let (x64, w64, b64) = (x.mapv(|v| v as f64), w.mapv(|v| v as f64), b.mapv(|v| v as f64));
    assert!(rel_err(y.iter(), ref_dense(&x64, &w64, &b64).iter()) <= tol::F32_FORWARD);
    let rr = rand2(&mut r, y.dim(), -1.0, 1.0);
    let r64 = rr.mapv(|v| v as f64);
    let (dx, dw, db) = dense_backward(x.view(), w.view(), rr.view());
    for _ in 0..SAMPLES {
        let i = (r.gen_range(0..bsz), r.gen_range(0..i_n));
        assert_grad(
            "dense dX",
            dx[i] as f64,
            fd2(&x64, i, &|x| dot2(&ref_dense(x, &w64, &b64), &r64)),
        );
        let i = (r.gen_range(0..i_n), r.gen_range(0..o_n));
        assert_grad(
            "dense dW",
            dw[i] as f64,
            fd2(&w64, i, &|w| dot2(&ref_dense(&x64, w, &b64), &r64)),
        );
        let c = r.gen_range(0..o_n);
        assert_grad(
            "dense db",
            db[c] as f64,
            fd1(&b64, c, &|b| dot2(&ref_dense(&x64, &w64, b), &r64)),
        );
    }
}

#[test]
fn softmax_cross_entropy_matches_finite_differences() {
    let mut r = rng(900);
    let logits = rand2(&mut r, (6, 10), -3.0, 3.0);
    let labels: Vec<u8> = (0..6).map(|_| r.gen_range(0..10)).collect();
    let (loss, grad) = softmax_cross_entropy(logits.view(), &labels);
    let l64 = logits.mapv(|v| v as f64);
    let want = ref_softmax_ce(&l64, &labels);
    assert!(
        (loss as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
        "loss {loss} vs {want}"
    );
    for i in ndarray::indices((6, 10)) {
        assert_grad(
            "softmax-CE dlogits",
            grad[i] as f64,
            fd2(&l64, i, &|l| ref_softmax_ce(l, &labels)),
        );
    }
    // Stable for huge logits (a naive exp would overflow to inf/NaN).
    let big = Array2::from_shape_fn((2, 3), |(i, j)| if j == i { 1000.0f32 } else { -1000.0 });
    let (loss, grad) = softmax_cross_entropy(big.view(), &[0, 0]);
    assert!(loss.is_finite() && grad.iter().all(|g| g.is_finite()));
    assert!(
        (loss - 1000.0).abs() < 1e-3,
        "one right (0), one wrong by 2000: mean 1000, got {loss}"
    );
}

#[test]
fn smoothed_cross_entropy_matches_finite_differences() {
    let mut r = rng(901);
    let logits = rand2(&mut r, (5, 7), -3.0, 3.0);
    let labels: Vec<u8> = (0..5).map(|_| r.gen_range(0..7)).collect();
    let eps = 0.1;
    // Reference in f64: mean over rows of -sum_j target_j log softmax_j.
    let reference = |l: &ndarray::Array2<f64>| {
        let mut s = 0.0;
        for (i, row) in l.rows().into_iter().enumerate() {
            let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            for (j, &v) in row.iter().enumerate() {
                let t = if j == labels[i] as usize {
                    1.0 - eps + eps / 7.0
                } else {
                    eps / 7.0
                };
                s += t * (lse - v);
            }
        }
        s / l.nrows() as f64
    };
    let (loss, grad) = softmax_cross_entropy_smoothed(logits.view(), &labels, eps as f32);
    let l64 = logits.mapv(|v| v as f64);
    let want = reference(&l64);
    assert!((loss as f64 - want).abs() <= 1e-5 * want.abs(), "loss {loss} vs {want}");
    for i in ndarray::indices((5, 7)) {
        assert_grad("smoothed CE dlogits", grad[i] as f64, fd2(&l64, i, &reference));
    }
    // eps = 0 is the plain loss, to the last bit.
    let (a, ga) = softmax_cross_entropy_smoothed(logits.view(), &labels, 0.0);
    let (b, gb) = softmax_cross_entropy(logits.view(), &labels);
    assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    assert!(
        ga.iter().zip(gb.iter()).all(|(x, y)| (x - y).abs() <= 1e-7),
        "gradients differ"
    );
}

/// The head with a standardization layer: gradients through the norm by
/// finite differences, and `folded()` computes the same logits.
#[test]
fn standardized_head_gradient_and_folding() {
    use vgg16_cpu::model::{head_backward, head_forward, Dense, Head, Norm};
    let mut r = rng(902);
    let g = rand2(&mut r, (4, 6), 0.0, 50.0);
    let norm = Norm::of(g.view());
    let head = Head {
        hidden: Some(Dense {
            w: rand2(&mut r, (6, 5), -0.5, 0.5),
            b: rand1(&mut r, 5, -0.1, 0.1),
        }),
        out: Dense {
            w: rand2(&mut r, (5, 3), -0.5, 0.5),
            b: rand1(&mut r, 3, -0.1, 0.1),
        },
        dropout: 0.0,
        norm: Some(norm),
    };
    let (logits, acts) = head_forward(&head, g.view(), None);
    let folded = head.folded();
    assert!(folded.norm.is_none());
    let (lf, _) = head_forward(&folded, g.view(), None);
    let e = rel_err(lf.iter(), logits.mapv(|v| v as f64).iter());
    assert!(e <= 1e-5, "folded head differs: {e}");
    // d(sum logits * R)/dG by central differences in f32 (the norm and
    // ReLU are smooth away from kinks at this draw).
    let rw = rand2(&mut r, (4, 3), -1.0, 1.0);
    let (dg, _) = head_backward(&head, &acts, rw.view());
    let f = |x: &ndarray::Array2<f32>| -> f64 {
        let (l, _) = head_forward(&head, x.view(), None);
        l.iter().zip(rw.iter()).map(|(a, b)| (*a as f64) * (*b as f64)).sum()
    };
    for i in ndarray::indices((4, 6)) {
        let h = 1e-2f32;
        let (mut p, mut m) = (g.clone(), g.clone());
        p[i] += h;
        m[i] -= h;
        let num = (f(&p) - f(&m)) / (2.0 * h as f64);
        assert!(
            (dg[i] as f64 - num).abs() <= 2e-3 * num.abs().max(1e-2),
            "dG{i:?}: {} vs {num}",
            dg[i]
        );
    }
}
