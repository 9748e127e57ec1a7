//! The transfer head, trained in both stages, as plain forward / backward
//! functions: GAP features (B, 512) -> [Dense(H, ReLU) -> dropout] ->
//! Dense(classes) logits. Activations that backward needs are returned by
//! forward in a small struct, llm.c style.

use crate::tensor::ops::{dense_backward, dense_forward};
use ndarray::{Array1, Array2, ArrayView2};
use rand::Rng;

/// Dense(I, O): w (I, O), b (O).
#[derive(Clone, Debug)]
pub struct Dense {
    pub w: Array2<f32>,
    pub b: Array1<f32>,
}

impl Dense {
    /// Keras's default: glorot-uniform weights, zero bias.
    pub fn glorot(rng: &mut impl Rng, fan_in: usize, fan_out: usize) -> Dense {
        let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
        Dense {
            w: Array2::from_shape_fn((fan_in, fan_out), |_| rng.gen_range(-limit..limit)),
            b: Array1::zeros(fan_out),
        }
    }

    pub fn zeros_like(&self) -> Dense {
        Dense {
            w: Array2::zeros(self.w.dim()),
            b: Array1::zeros(self.b.len()),
        }
    }
}

/// GAP features (B, 512) -> logits (B, classes).
#[derive(Clone, Debug)]
pub struct Head {
    pub hidden: Option<Dense>,
    pub out: Dense,
    /// Dropout rate before the classifier (training only).
    pub dropout: f32,
    /// A fixed standardization of the features in front of the first Dense
    /// (`--standardize`); not trained. [`Head::folded`] merges it into the
    /// Dense for saving.
    pub norm: Option<Norm>,
}

/// x -> (x - mean) * inv_std, per feature channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Norm {
    pub mean: Array1<f32>,
    pub inv_std: Array1<f32>,
}

impl Norm {
    /// Per-channel mean and 1/std of `x` (N, C), sums in f64; channels with
    /// (almost) no spread get 1/std = 1 so they pass centred, not amplified.
    pub fn of(x: ArrayView2<f32>) -> Norm {
        let n = x.nrows().max(1) as f64;
        let c = x.ncols();
        let mut mean = vec![0.0f64; c];
        let mut sq = vec![0.0f64; c];
        for row in x.rows() {
            for (j, &v) in row.iter().enumerate() {
                mean[j] += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n);
        for row in x.rows() {
            for (j, &v) in row.iter().enumerate() {
                sq[j] += (v as f64 - mean[j]).powi(2);
            }
        }
        let inv_std = sq
            .iter()
            .map(|&s| {
                let sd = (s / n).sqrt();
                if sd > 1e-6 {
                    (1.0 / sd) as f32
                } else {
                    1.0
                }
            })
            .collect();
        Norm {
            mean: mean.iter().map(|&m| m as f32).collect(),
            inv_std,
        }
    }

    pub fn apply(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let mut y = x.to_owned();
        for mut row in y.rows_mut() {
            for ((v, &m), &s) in row.iter_mut().zip(&self.mean).zip(&self.inv_std) {
                *v = (*v - m) * s;
            }
        }
        y
    }
}

impl Head {
    pub fn new(rng: &mut impl Rng, hidden: Option<usize>, dropout: f32, classes: usize) -> Head {
        let h = hidden.map(|n| Dense::glorot(rng, 512, n));
        let width = hidden.unwrap_or(512);
        Head {
            hidden: h,
            out: Dense::glorot(rng, width, classes),
            dropout,
            norm: None,
        }
    }

    /// Zeros of the trained tensors' shapes (velocities, gradients); the
    /// fixed norm is kept.
    /// How many random numbers [`head_forward`] draws for `rows` rows in
    /// training (one per dropout mask element; 0 without dropout).
    pub fn dropout_draws(&self, rows: usize) -> usize {
        if self.dropout <= 0.0 {
            return 0;
        }
        rows * match &self.hidden {
            Some(d) => d.w.dim().1,
            None => self.out.w.dim().0,
        }
    }

    pub fn zeros_like(&self) -> Head {
        Head {
            hidden: self.hidden.as_ref().map(Dense::zeros_like),
            out: self.out.zeros_like(),
            dropout: self.dropout,
            norm: self.norm.clone(),
        }
    }

    /// The same function without a norm layer: the first Dense absorbs it,
    /// W' = diag(inv_std) W, b' = b - (mean * inv_std) W.
    pub fn folded(&self) -> Head {
        let Some(n) = &self.norm else {
            return self.clone();
        };
        let mut h = self.clone();
        h.norm = None;
        let first = h.hidden.as_mut().unwrap_or(&mut h.out);
        let shift: Array1<f32> = &n.mean * &n.inv_std;
        let w = first.w.clone();
        for (i, mut row) in first.w.rows_mut().into_iter().enumerate() {
            row *= n.inv_std[i];
        }
        first.b = &first.b - &shift.dot(&w);
        h
    }

    /// Every tensor, in a fixed order (optimizer and checkpoints).
    pub fn tensors_mut(&mut self) -> Vec<&mut [f32]> {
        let mut v = Vec::new();
        if let Some(h) = &mut self.hidden {
            v.push(h.w.as_slice_mut().expect("owned"));
            v.push(h.b.as_slice_mut().expect("owned"));
        }
        v.push(self.out.w.as_slice_mut().expect("owned"));
        v.push(self.out.b.as_slice_mut().expect("owned"));
        v
    }

    pub fn tensors(&self) -> Vec<(&'static str, &[f32], Vec<usize>)> {
        let mut v = Vec::new();
        if let Some(h) = &self.hidden {
            v.push(("dense/kernel", h.w.as_slice().expect("owned"), h.w.shape().to_vec()));
            v.push(("dense/bias", h.b.as_slice().expect("owned"), h.b.shape().to_vec()));
        }
        v.push((
            "classification/kernel",
            self.out.w.as_slice().expect("owned"),
            self.out.w.shape().to_vec(),
        ));
        v.push((
            "classification/bias",
            self.out.b.as_slice().expect("owned"),
            self.out.b.shape().to_vec(),
        ));
        v
    }
}

/// What [`head_forward`] keeps for backward.
pub struct HeadActs {
    g: Array2<f32>,
    /// Hidden activations after ReLU and dropout, and the dropout scale mask.
    h: Option<(Array2<f32>, Array2<f32>)>,
}

/// Logits (B, classes). `rng` enables dropout (training); None = inference.
pub fn head_forward(head: &Head, g: ArrayView2<f32>, rng: Option<&mut dyn rand::RngCore>) -> (Array2<f32>, HeadActs) {
    match &head.norm {
        Some(n) => head_forward_normed(head, n.apply(g).view(), rng),
        None => head_forward_normed(head, g, rng),
    }
}

/// [`head_forward`] from the (standardized) features.
fn head_forward_normed(
    head: &Head,
    g: ArrayView2<f32>,
    rng: Option<&mut dyn rand::RngCore>,
) -> (Array2<f32>, HeadActs) {
    let mut rng = rng;
    let (x, h) = match &head.hidden {
        Some(d) => {
            let mut h = dense_forward(g, d.w.view(), d.b.view());
            h.mapv_inplace(|v| v.max(0.0));
            let keep = 1.0 - head.dropout;
            let mask = match rng.as_mut() {
                Some(r) if head.dropout > 0.0 => {
                    Array2::from_shape_fn(h.dim(), |_| if r.gen::<f32>() < keep { 1.0 / keep } else { 0.0 })
                }
                _ => Array2::from_elem(h.dim(), 1.0),
            };
            h *= &mask;
            (h.clone(), Some((h, mask)))
        }
        None => {
            let mut x = g.to_owned();
            if let Some(r) = rng.as_mut().filter(|_| head.dropout > 0.0) {
                let keep = 1.0 - head.dropout;
                let mask = Array2::from_shape_fn(x.dim(), |_| if r.gen::<f32>() < keep { 1.0 / keep } else { 0.0 });
                x *= &mask;
                let xc = x.clone();
                let logits = dense_forward(xc.view(), head.out.w.view(), head.out.b.view());
                return (
                    logits,
                    HeadActs {
                        g: g.to_owned(),
                        h: Some((xc, mask)),
                    },
                );
            }
            (x, None)
        }
    };
    let logits = dense_forward(x.view(), head.out.w.view(), head.out.b.view());
    (logits, HeadActs { g: g.to_owned(), h })
}

/// Backward through the head: returns (dG (B, 512), head gradients).
pub fn head_backward(head: &Head, acts: &HeadActs, dlogits: ArrayView2<f32>) -> (Array2<f32>, Head) {
    let (mut dg, grads) = head_backward_normed(head, acts, dlogits);
    if let Some(n) = &head.norm {
        for mut row in dg.rows_mut() {
            row *= &n.inv_std;
        }
    }
    (dg, grads)
}

/// [`head_backward`] up to the (standardized) features.
fn head_backward_normed(head: &Head, acts: &HeadActs, dlogits: ArrayView2<f32>) -> (Array2<f32>, Head) {
    let mut grads = head.zeros_like();
    match (&head.hidden, &acts.h) {
        (Some(d), Some((h, mask))) => {
            let (dh, dw, db) = dense_backward(h.view(), head.out.w.view(), dlogits);
            grads.out = Dense { w: dw, b: db };
            // Through dropout, then ReLU (h > 0 exactly where the ReLU passed,
            // unless dropout zeroed it, and then mask is 0 as well).
            let dpre = dh * mask;
            let dpre = ndarray::Zip::from(&dpre)
                .and(h)
                .map_collect(|&d, &v| if v > 0.0 { d } else { 0.0 });
            let (dg, dw1, db1) = dense_backward(acts.g.view(), d.w.view(), dpre.view());
            grads.hidden = Some(Dense { w: dw1, b: db1 });
            (dg, grads)
        }
        (None, Some((x, mask))) => {
            let (dx, dw, db) = dense_backward(x.view(), head.out.w.view(), dlogits);
            grads.out = Dense { w: dw, b: db };
            (dx * mask, grads)
        }
        _ => {
            let (dg, dw, db) = dense_backward(acts.g.view(), head.out.w.view(), dlogits);
            grads.out = Dense { w: dw, b: db };
            (dg, grads)
        }
    }
}
