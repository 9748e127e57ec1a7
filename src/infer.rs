//! Using a saved model: [`EvaluateJob`] (accuracy, loss, per-class report
//! and confusion matrix on a split, through a matching activation cache
//! when one exists) and [`PredictJob`] (top-k classes of image files).

use crate::data::image::load_resized_into;
use crate::data::{Dataset, Records};
use crate::error::{Error, Result};
use crate::features::cache::{self, CacheKey, Dtype};
use crate::features::{batched_logits, BatchedForward, Cached, Features, Live};
use crate::model::saved::SavedModel;
use crate::model::vgg::BLOCK5_START;
use crate::model::{head_forward, Block5Infer};
use crate::observer::Observer;
use crate::report::metrics::{self, Report};
use crate::tensor::ops::softmax;
use ndarray::Array2;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A saved model on the first `records` records of a split.
pub struct EvaluateJob<'a> {
    pub model: &'a SavedModel,
    pub data: &'a Dataset,
    pub records: usize,
    /// Images per forward batch.
    pub batch_size: usize,
    /// Where to look for an activation cache of blocks 1-4 made from the
    /// same base weights, size and data (None: always run the network).
    pub cache_dir: Option<PathBuf>,
}

pub struct EvaluateOutcome {
    pub report: Report,
    pub logits: Array2<f32>,
    /// The cache that served blocks 1-4, if one did.
    pub cache: Option<PathBuf>,
    pub seconds: f64,
}

impl EvaluateJob<'_> {
    pub fn run(&self, obs: &mut dyn Observer) -> Result<EvaluateOutcome> {
        let t0 = Instant::now();
        let (model, data) = (self.model, self.data);
        let size = model.meta.image_size;
        if self.batch_size == 0 {
            crate::config_bail!("--batch-size must be at least 1");
        }
        if self.records == 0 || data.is_empty() {
            crate::config_bail!(
                "nothing to evaluate: {} records asked of a {}-record {} split",
                self.records,
                data.len(),
                data.split.name()
            );
        }
        if data.class_names != model.meta.class_names {
            crate::config_bail!(
                "the model's {} classes ({}) are not the dataset's {} ({}): evaluate a model on data with its own classes",
                model.meta.class_names.len(),
                short_list(&model.meta.class_names),
                data.class_names.len(),
                short_list(&data.class_names)
            );
        }
        if matches!(data.records, Records::Files(_)) && data.resize() != model.meta.resize() {
            crate::config_bail!(
                "the model was trained on images resized by '{}', the folder is read with '{}' (open it with --resize {})",
                model.meta.resize,
                data.resize().name(),
                model.meta.resize
            );
        }
        let n = self.records.min(data.len());
        let idx: Vec<usize> = (0..n).collect();
        let found = self.cache_dir.as_ref().and_then(|dir| {
            [Dtype::F32, Dtype::F16].into_iter().find_map(|dt| {
                let key = CacheKey::new(&model.meta.base_weights_digest, size, data, n, dt);
                let found = cache::find(dir, &key)?;
                cache::open(&found, &key, data).ok().flatten()
            })
        });
        let live = Live::new(&model.base, data, size, n);
        let cached = found.as_ref().map(Cached);
        let feats: &dyn Features = match &cached {
            Some(c) => c,
            None => &live,
        };
        obs.begin("evaluate", n as u64, "img");
        let mut b5 = Block5Infer::new();
        let logits = batched_logits(&idx, self.batch_size, model.meta.class_names.len(), |c| {
            let g = b5.features(model.block5(), feats.block4(c)?.view());
            obs.advance(c.len() as u64, "");
            Ok(head_forward(&model.head, g.view(), None).0)
        })?;
        obs.end();
        let report = metrics::report(&logits, &data.labels[..n], &model.meta.class_names);
        Ok(EvaluateOutcome {
            report,
            logits,
            cache: found.map(|c| c.dir),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

/// Top-k classes of image files under a saved model, each image resized
/// the way the model was trained ([`crate::model::saved::ModelMeta::resize`]).
/// Images are decoded a batch at a time (in parallel), so any number of
/// files takes the memory of one batch.
pub struct PredictJob<'a> {
    pub model: &'a SavedModel,
    pub images: &'a [PathBuf],
    pub top_k: usize,
    pub batch_size: usize,
}

/// One image's answer: (class name, probability), most likely first.
pub type TopK = Vec<(String, f32)>;

impl PredictJob<'_> {
    /// Calls `each(file, answer)` for every image in order; a file that
    /// cannot be read gets its error there and the others go on. Returns
    /// how many could not be read.
    pub fn run(&self, mut each: impl FnMut(&Path, Result<TopK>)) -> usize {
        use rayon::prelude::*;
        let model = self.model;
        let names = &model.meta.class_names;
        let k = self.top_k.clamp(1, names.len().max(1));
        let (size, resize) = (model.meta.image_size, model.meta.resize());
        let px = size * size * 3;
        let forward = BatchedForward::new(&model.base, size, self.batch_size);
        let mut b5 = Block5Infer::new();
        let mut failed = 0;
        for chunk in self.images.chunks(self.batch_size.max(1)) {
            // Decode the chunk in parallel; keep the readable ones in order.
            let mut buf = vec![0.0f32; chunk.len() * px];
            let loaded: Vec<Option<Error>> = buf
                .par_chunks_mut(px)
                .zip(chunk.par_iter())
                .map(|(dst, p)| load_resized_into(p, resize, size, dst).err())
                .collect();
            let ok: Vec<usize> = (0..chunk.len()).filter(|&i| loaded[i].is_none()).collect();
            let mut x = ndarray::Array4::<f32>::zeros((ok.len(), size, size, 3));
            for (row, &i) in ok.iter().enumerate() {
                x.as_slice_mut().expect("fresh")[row * px..(row + 1) * px].copy_from_slice(&buf[i * px..(i + 1) * px]);
            }
            drop(buf);
            let mut answers: Vec<Option<TopK>> = vec![None; chunk.len()];
            let r: Result<(), Error> = forward.run(
                ok.len(),
                |r| Ok(x.slice(ndarray::s![r, .., .., ..]).to_owned()),
                0..BLOCK5_START,
                &|_| false,
                |_, _, _| Ok(()),
                |r, x4| {
                    let g = b5.features(model.block5(), x4.view());
                    let (logits, _) = head_forward(&model.head, g.view(), None);
                    let probs = softmax(logits.view());
                    for (&i, p) in ok[r].iter().zip(probs.rows()) {
                        let mut order: Vec<usize> = (0..names.len()).collect();
                        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                        answers[i] = Some(order[..k].iter().map(|&c| (names[c].clone(), p[c])).collect());
                    }
                    Ok(())
                },
            );
            r.expect("no step of predict's forward fails");
            for ((p, err), ans) in chunk.iter().zip(loaded).zip(answers) {
                match (err, ans) {
                    (Some(e), _) => {
                        failed += 1;
                        each(p, Err(e))
                    }
                    (None, Some(top)) => each(p, Ok(top)),
                    (None, None) => unreachable!("every readable image has an answer"),
                }
            }
        }
        failed
    }
}

/// "a, b, c, ... (100)" for messages.
fn short_list(names: &[String]) -> String {
    if names.len() <= 4 {
        names.join(", ")
    } else {
        format!("{}, ... {}", names[..3].join(", "), names[names.len() - 1])
    }
}
