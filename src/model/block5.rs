//! Block5 of VGG-16 (three 3x3 convs + max-pool, trained in stage 2) and
//! the global average pooling after it, as plain forward / backward
//! functions over block5's [`ConvParams`] (`Vgg16::block5`, names
//! [`crate::model::vgg::block5_names`]): block4_pool (B, s, s, 512) ->
//! GAP features (B, 512).

use crate::model::vgg::ConvParams;
use crate::tensor::conv::{conv3x3_backward, conv3x3_forward, conv3x3_forward_step, ConvGrads};
use crate::tensor::ops::{
    gap_backward, gap_forward, maxpool2x2_backward, maxpool2x2_forward, maxpool2x2_infer, relu_backward,
};
use ndarray::{Array2, Array4, ArrayView2, ArrayView4};

/// What [`block5_forward`] keeps for backward.
pub struct Block5Acts {
    x4: Array4<f32>,
    c1: Array4<f32>,
    c2: Array4<f32>,
    c3: Array4<f32>,
    arg: Array4<u8>,
    pool_hw: (usize, usize),
}

/// block4_pool (B, s, s, 512) -> GAP of block5_pool (B, 512), keeping what
/// backward needs.
pub fn block5_forward(p: &[ConvParams], x4: Array4<f32>) -> (Array2<f32>, Block5Acts) {
    assert_eq!(p.len(), 3, "block5 has three convs");
    let c1 = conv3x3_forward_step(x4.view(), p[0].w.view(), Some(p[0].b.view()), true);
    let c2 = conv3x3_forward_step(c1.view(), p[1].w.view(), Some(p[1].b.view()), true);
    let c3 = conv3x3_forward_step(c2.view(), p[2].w.view(), Some(p[2].b.view()), true);
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

/// Inference only: block4_pool -> GAP features.
pub fn block5_features(p: &[ConvParams], x4: ArrayView4<f32>) -> Array2<f32> {
    let c1 = conv3x3_forward(x4, p[0].w.view(), Some(p[0].b.view()), true);
    let c2 = conv3x3_forward(c1.view(), p[1].w.view(), Some(p[1].b.view()), true);
    let c3 = conv3x3_forward(c2.view(), p[2].w.view(), Some(p[2].b.view()), true);
    gap_forward(maxpool2x2_infer(c3.view()).view())
}

/// Backward from dG (B, 512) to block5's parameter gradients. conv5_3 and
/// conv5_2 propagate dX; conv5_1, the lowest trainable layer, does not.
pub fn block5_backward(p: &[ConvParams], acts: &Block5Acts, dg: ArrayView2<f32>) -> Vec<ConvGrads> {
    block5_backward_each(p, acts, dg, &mut |_, _| {})
}

/// [`block5_backward`], handing each layer's gradients to `ready` as soon
/// as they exist: conv5_3's (index 2) first, then conv5_2's, conv5_1's.
/// Data parallelism sums a layer's gradients over ranks while the layers
/// below it still run backward.
pub fn block5_backward_each(
    p: &[ConvParams],
    acts: &Block5Acts,
    dg: ArrayView2<f32>,
    ready: &mut dyn FnMut(usize, &ConvGrads),
) -> Vec<ConvGrads> {
    let dpool = gap_backward(dg, acts.pool_hw.0, acts.pool_hw.1);
    let dc3 = maxpool2x2_backward(dpool.view(), acts.arg.view(), acts.c3.dim());
    let dz3 = relu_backward(acts.c3.view(), dc3.view());
    let g3 = conv3x3_backward(acts.c2.view(), p[2].w.view(), dz3.view(), true);
    ready(2, &g3);
    let dz2 = relu_backward(acts.c2.view(), g3.dx.as_ref().expect("asked for dx").view());
    let g2 = conv3x3_backward(acts.c1.view(), p[1].w.view(), dz2.view(), true);
    ready(1, &g2);
    let dz1 = relu_backward(acts.c1.view(), g2.dx.as_ref().expect("asked for dx").view());
    let g1 = conv3x3_backward(acts.x4.view(), p[0].w.view(), dz1.view(), false);
    ready(0, &g1);
    vec![g1, g2, g3]
}
