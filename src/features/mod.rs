//! Where the trainable part's inputs come from.
//!
//! - [`BatchedForward`]: the one loop "records -> preprocess -> layers", a
//!   batch at a time, kernels prepared once. The cache build, `extract`,
//!   the live feature source, `evaluate` without a cache and `predict` all
//!   run the base through it.
//! - [`cache`]: the on-disk activation cache of blocks 1-4 (and the stage-1
//!   GAP features), built once per dataset, size and weights.
//! - [`Features`]: the inputs of stage 1 (GAP features) and stage 2
//!   (block4_pool) by record index, from the cache ([`Cached`]) or computed
//!   on every batch ([`Live`], `--no-cache`, as Keras does).
//! - [`extract`]: activations of any layers into one `.npz`.

pub mod cache;
pub mod extract;

use crate::data::Dataset;
use crate::error::Result;
use crate::model::block5::Block5Infer;
use crate::model::head::{head_forward, Head};
use crate::model::vgg::{auto_batch, ConvParams, Prepared, Vgg16, BLOCK5_START, LAYERS};
use crate::tensor::ops::gap_forward;
use cache::Cache;
use ndarray::{Array2, Array4, ArrayView4};
use std::ops::Range;

/// The base run over many records: `batch` images at a time, each
/// preprocessed and resized to `size`, kernels prepared once.
pub struct BatchedForward<'m> {
    net: Prepared<'m>,
    pub size: usize,
    pub batch: usize,
}

impl<'m> BatchedForward<'m> {
    pub fn new(model: &'m Vgg16, size: usize, batch: usize) -> BatchedForward<'m> {
        BatchedForward {
            net: model.prepare(),
            size,
            batch: batch.max(1),
        }
    }

    /// Runs `LAYERS[layers]` on records `0..n`, a batch at a time;
    /// `input(records)` gives a batch's (B, S, S, 3) network input (see
    /// [`Dataset::input`]). After each layer of a batch, `tap(records,
    /// layer, output)` sees its output, except a conv layer's that `keep`
    /// does not ask for when it runs fused with the pool after it
    /// ([`Prepared::forward_layers`]); after the batch, `done(records,
    /// last output)`. The first error stops the loop.
    pub fn run<E>(
        &self,
        n: usize,
        input: impl Fn(Range<usize>) -> std::result::Result<Array4<f32>, E>,
        layers: Range<usize>,
        keep: &dyn Fn(usize) -> bool,
        mut tap: impl FnMut(Range<usize>, usize, ArrayView4<f32>) -> std::result::Result<(), E>,
        mut done: impl FnMut(Range<usize>, Array4<f32>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        for start in (0..n).step_by(self.batch) {
            let end = (start + self.batch).min(n);
            let x = input(start..end)?;
            let mut err = None;
            let y = self.net.forward_layers(x, layers.clone(), keep, &mut |i, a| {
                if err.is_none() {
                    err = tap(start..end, i, a).err();
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
            done(start..end, y)?;
        }
        Ok(())
    }

    /// `LAYERS[layers]` of records `idx` of `data`, joined along the batch axis.
    pub fn collect(&self, data: &Dataset, idx: &[usize], layers: Range<usize>) -> Result<Array4<f32>> {
        let mut parts = Vec::new();
        self.run(
            idx.len(),
            |r| data.input(&idx[r], self.size),
            layers,
            &|_| false,
            |_, _, _| Ok(()),
            |_, y| {
                parts.push(y);
                Ok(())
            },
        )?;
        let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
        Ok(ndarray::concatenate(ndarray::Axis(0), &views).expect("batches agree on shape"))
    }
}

/// Inputs of the trainable part, by record index within a split.
pub trait Features: Sync {
    fn labels(&self) -> &[u8];
    /// Stage-1 features: GAP of block5_pool with the pretrained block5 (B, 512).
    fn gap(&self, idx: &[usize]) -> Result<Array2<f32>>;
    /// block4_pool (B, S/16, S/16, 512).
    fn block4(&self, idx: &[usize]) -> Result<Array4<f32>>;
}

/// From the activation cache (memory-mapped).
pub struct Cached<'a>(pub &'a Cache);

impl Features for Cached<'_> {
    fn labels(&self) -> &[u8] {
        &self.0.labels
    }
    fn gap(&self, idx: &[usize]) -> Result<Array2<f32>> {
        Ok(self.0.gap_rows(idx))
    }
    fn block4(&self, idx: &[usize]) -> Result<Array4<f32>> {
        Ok(self.0.block4(idx))
    }
}

/// Recomputed from the images every time (`--no-cache`), in sub-batches of
/// auto_batch(S) images, so memory stays bounded at 224 px whatever the
/// training batch size.
pub struct Live<'a> {
    forward: BatchedForward<'a>,
    data: &'a Dataset,
    records: usize,
}

impl<'a> Live<'a> {
    /// Records `0..records` of `data` through `model` at input size `size`.
    pub fn new(model: &'a Vgg16, data: &'a Dataset, size: usize, records: usize) -> Live<'a> {
        Live {
            forward: BatchedForward::new(model, size, auto_batch(size)),
            data,
            records,
        }
    }
}

impl Features for Live<'_> {
    fn labels(&self) -> &[u8] {
        &self.data.labels[..self.records]
    }
    fn gap(&self, idx: &[usize]) -> Result<Array2<f32>> {
        let y = self.forward.collect(self.data, idx, 0..LAYERS.len())?;
        Ok(gap_forward(y.view()))
    }
    fn block4(&self, idx: &[usize]) -> Result<Array4<f32>> {
        self.forward.collect(self.data, idx, 0..BLOCK5_START)
    }
}

/// Logits of the records `idx`, computed `batch` at a time by `logits_of`
/// (which maps a chunk of record indices to its (chunk, classes) logits).
pub fn batched_logits(
    idx: &[usize],
    batch: usize,
    classes: usize,
    mut logits_of: impl FnMut(&[usize]) -> Result<Array2<f32>>,
) -> Result<Array2<f32>> {
    let batch = batch.max(1);
    let mut all = Array2::<f32>::zeros((idx.len(), classes));
    for (bi, chunk) in idx.chunks(batch).enumerate() {
        all.slice_mut(ndarray::s![bi * batch..bi * batch + chunk.len(), ..])
            .assign(&logits_of(chunk)?);
    }
    Ok(all)
}

/// Logits of stage 1's model (the head on the pretrained base's GAP
/// features) for records `idx`, no dropout.
pub fn logits_stage1(head: &Head, feats: &dyn Features, idx: &[usize], batch: usize) -> Result<Array2<f32>> {
    batched_logits(idx, batch, head.out.b.len(), |c| {
        Ok(head_forward(head, feats.gap(c)?.view(), None).0)
    })
}

/// Logits through block5 (stage 2's weights) and the head, no dropout.
pub fn logits_stage2(
    block5: &[ConvParams],
    head: &Head,
    feats: &dyn Features,
    idx: &[usize],
    batch: usize,
) -> Result<Array2<f32>> {
    let mut b5 = Block5Infer::new();
    batched_logits(idx, batch, head.out.b.len(), |c| {
        Ok(head_forward(head, b5.features(block5, feats.block4(c)?.view()).view(), None).0)
    })
}
