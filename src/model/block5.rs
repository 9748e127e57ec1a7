//! Block5 of VGG-16 (three 3x3 convs + max-pool, trained in stage 2) and
//! the global average pooling after it, as plain forward / backward
//! functions over block5's [`ConvParams`] (`Vgg16::block5`, names
//! [`crate::model::vgg::block5_names`]): block4_pool (B, s, s, 512) ->
//! GAP features (B, 512).

use crate::model::vgg::ConvParams;
use crate::tensor::conv::{
    conv3x3_backward_prepared, conv3x3_forward, conv3x3_forward_prepared, conv3x3_forward_step, ConvGrads, KernelSlot,
};
use crate::tensor::dispatch::{ConvAlgo, ConvPath, Dispatch};
use crate::tensor::ops::{
    gap_backward, gap_forward, maxpool2x2_backward, maxpool2x2_forward, maxpool2x2_infer, relu_backward,
};
use ndarray::{Array2, Array4, ArrayView1, ArrayView2, ArrayView4};

/// What [`block5_forward`] keeps for backward.
pub struct Block5Acts {
    x4: Array4<f32>,
    c1: Array4<f32>,
    c2: Array4<f32>,
    c3: Array4<f32>,
    arg: Array4<u8>,
    pool_hw: (usize, usize),
}

/// Block5's kernels prepared (packed or Winograd-transformed) for the
/// current weights: the forward's of the three convs and dX's of conv5_2
/// and conv5_3, made once per training step by the first
/// [`block5_forward`] after [`Block5Kernels::weights_changed`] and shared by
/// every part of the step (`--accumulate`, ranks' parts) and by backward.
/// The buffers are kept from step to step and refilled.
#[derive(Default)]
pub struct Block5Kernels {
    forward: [KernelSlot; 3],
    /// dX's kernels; conv5_1 (index 0) has no dX.
    dx: [KernelSlot; 3],
    /// The paths (forward of each conv, then dX of conv5_2, conv5_3) the
    /// kernels are prepared on, None after new weights.
    ready: Option<[ConvPath; 5]>,
}

impl Block5Kernels {
    /// Kernels for weights not seen yet.
    pub fn new() -> Block5Kernels {
        Block5Kernels::default()
    }

    /// The weights changed (an optimizer step): the next forward prepares
    /// the kernels again. Forgetting this would run the old weights.
    pub fn weights_changed(&mut self) {
        self.ready = None;
    }

    /// Prepares every kernel for `n` images of block4_pool side `s`, on the
    /// paths the dispatch picks for a step of that size
    /// ([`Dispatch::path_unprepared`]), unless they already are (parts of
    /// one step differ by a row at most, and take the same paths).
    fn ensure(&mut self, p: &[ConvParams], n: usize, s: usize) {
        let d = Dispatch::global();
        let path = |c: usize| d.path_unprepared(ConvAlgo::Auto, n, s, s, c);
        let ch = |l: usize| (p[l].w.dim().2, p[l].w.dim().3);
        let paths = [
            path(ch(0).0),
            path(ch(1).0),
            path(ch(2).0),
            path(ch(1).1),
            path(ch(2).1),
        ];
        if self.ready == Some(paths) {
            return;
        }
        for (l, c) in p.iter().enumerate() {
            self.forward[l].prepare(paths[l], c.w.view(), false);
            if l > 0 {
                self.dx[l].prepare(paths[2 + l], c.w.view(), true);
            }
        }
        self.ready = Some(paths);
    }
}

/// block4_pool (B, s, s, 512) -> GAP of block5_pool (B, 512), keeping what
/// backward needs; `kernels` are prepared from `p` here unless they
/// already are (see [`Block5Kernels`]).
pub fn block5_forward(p: &[ConvParams], x4: Array4<f32>, kernels: &mut Block5Kernels) -> (Array2<f32>, Block5Acts) {
    assert_eq!(p.len(), 3, "block5 has three convs");
    let (n, s) = (x4.dim().0, x4.dim().1);
    kernels.ensure(p, n, s);
    let [c1, c2, c3] = three_convs(p, &kernels.forward, x4.view(), conv3x3_forward_step);
    let (pool, arg) = maxpool2x2_forward(c3.view());
    let g = gap_forward(pool.view());
    let pool_hw = (pool.dim().1, pool.dim().2);
    (
        g,
        Block5Acts {
            x4,
            c1,
            c2,
            c3,
            arg,
            pool_hw,
        },
    )
}

/// Inference only: block4_pool -> GAP features, preparing the kernels for
/// this call alone (see [`Block5Infer`] for many batches).
pub fn block5_features(p: &[ConvParams], x4: ArrayView4<f32>) -> Array2<f32> {
    Block5Infer::new().features(p, x4)
}

/// Block5's kernels for inference over many batches with one set of
/// weights (`evaluate`, `predict`, validation and the stage-end test):
/// prepared on the first batch, on the path [`conv3x3_forward`] takes
/// (by layer and side, never by batch: an image gets the same numbers in
/// any batch), and kept while the side stays the same. Before, every batch
/// transformed block5's three kernels again (at 224 px ~25 ms each with
/// a fresh 36 MB buffer; at 64 px as long as the convolutions).
/// Make a new one when the weights change.
#[derive(Default)]
pub struct Block5Infer {
    kernels: [KernelSlot; 3],
    side: Option<(usize, usize)>,
}

impl Block5Infer {
    pub fn new() -> Block5Infer {
        Block5Infer::default()
    }

    /// block4_pool (B, s, s, 512) -> GAP features (B, 512) with `p`'s
    /// weights (the same `p` at every call).
    pub fn features(&mut self, p: &[ConvParams], x4: ArrayView4<f32>) -> Array2<f32> {
        assert_eq!(p.len(), 3, "block5 has three convs");
        let side = (x4.dim().1, x4.dim().2);
        if self.side != Some(side) {
            let d = Dispatch::global();
            for (slot, c) in self.kernels.iter_mut().zip(p) {
                let path = d.path(ConvAlgo::Auto, side.0, side.1, c.w.dim().2);
                slot.prepare(path, c.w.view(), false);
            }
            self.side = Some(side);
        }
        let [_, _, c3] = three_convs(p, &self.kernels, x4, conv3x3_forward);
        gap_forward(maxpool2x2_infer(c3.view()).view())
    }
}

/// A conv layer's forward from its plain kernel (bias, ReLU), the shape
/// of `conv3x3_forward` and `conv3x3_forward_step`.
type PlainConv = fn(ArrayView4<f32>, ArrayView4<f32>, Option<ArrayView1<f32>>, bool) -> Array4<f32>;

/// Block5's three convs (bias + ReLU) on `kernels`' prepared forms, or on
/// `plain` for a layer whose path has none (tap classes, im2col).
fn three_convs(p: &[ConvParams], kernels: &[KernelSlot; 3], x4: ArrayView4<f32>, plain: PlainConv) -> [Array4<f32>; 3] {
    let conv = |l: usize, x: ArrayView4<f32>| match kernels[l].get() {
        Some(k) => conv3x3_forward_prepared(x, k, Some(p[l].b.view()), true),
        None => plain(x, p[l].w.view(), Some(p[l].b.view()), true),
    };
    let c1 = conv(0, x4);
    let c2 = conv(1, c1.view());
    let c3 = conv(2, c2.view());
    [c1, c2, c3]
}

/// Backward from dG (B, 512) to block5's parameter gradients. conv5_3 and
/// conv5_2 propagate dX; conv5_1, the lowest trainable layer, does not.
pub fn block5_backward(
    p: &[ConvParams],
    acts: &Block5Acts,
    dg: ArrayView2<f32>,
    kernels: &Block5Kernels,
) -> Vec<ConvGrads> {
    block5_backward_each(p, acts, dg, kernels, &mut |_, _| {})
}

/// [`block5_backward`], handing each layer's gradients to `ready` as soon
/// as they exist: conv5_3's (index 2) first, then conv5_2's, conv5_1's.
/// Data parallelism sums a layer's gradients over ranks while the layers
/// below it still run backward.
pub fn block5_backward_each(
    p: &[ConvParams],
    acts: &Block5Acts,
    dg: ArrayView2<f32>,
    kernels: &Block5Kernels,
    ready: &mut dyn FnMut(usize, &ConvGrads),
) -> Vec<ConvGrads> {
    // dX's kernels as the forward of this step prepared them.
    let dx = |l: usize| kernels.dx[l].get();
    let dpool = gap_backward(dg, acts.pool_hw.0, acts.pool_hw.1);
    let dc3 = maxpool2x2_backward(dpool.view(), acts.arg.view(), acts.c3.dim());
    let dz3 = relu_backward(acts.c3.view(), dc3.view());
    let g3 = conv3x3_backward_prepared(acts.c2.view(), p[2].w.view(), dz3.view(), true, dx(2));
    ready(2, &g3);
    let dz2 = relu_backward(acts.c2.view(), g3.dx.as_ref().expect("asked for dx").view());
    let g2 = conv3x3_backward_prepared(acts.c1.view(), p[1].w.view(), dz2.view(), true, dx(1));
    ready(1, &g2);
    let dz1 = relu_backward(acts.c1.view(), g2.dx.as_ref().expect("asked for dx").view());
    let g1 = conv3x3_backward_prepared(acts.x4.view(), p[0].w.view(), dz1.view(), false, None);
    ready(0, &g1);
    vec![g1, g2, g3]
}
