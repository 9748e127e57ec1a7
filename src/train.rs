//! The two-stage Keras recipe.
//!
//! Stage 1 trains the head on stage-1 features (GAP of the pretrained
//! base); stage 2 trains block5 and the head from block4_pool. Where the
//! inputs come from is a [`Features`] source: the on-disk cache (blocks 1-4
//! never rerun) or, with `--no-cache`, the network run on every batch as
//! Keras does, which exists to prove both give the same numbers.
//!
//! Keras `fit` semantics: reshuffle every epoch, keep the last partial
//! batch, loss = batch mean, SGD `v = m*v - lr*g; w += v` (a fresh optimizer,
//! so fresh momentum, per stage). Shuffling and dropout draw from ChaCha8
//! streams derived from (seed, stage, epoch), so a run resumed from a
//! checkpoint draws exactly what the uninterrupted run would have.

use crate::cache::Cache;
use crate::data::cifar::Dataset;
use crate::data::image::preprocess_batch;
use crate::model::*;
use crate::optim::sgd_momentum_step;
use crate::progress::Progress;
use crate::tensor::ops::{cross_entropy_per_sample, softmax_cross_entropy};
use crate::vgg::{auto_batch, ConvParams, Prepared, Vgg16, BLOCK5_START, LAYERS};
use anyhow::{bail, Context, Result};
use ndarray::{Array2, Array4, ArrayD};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Inputs of the trainable part, by record index within a split.
pub trait Features: Sync {
    fn labels(&self) -> &[u8];
    /// Stage-1 features: GAP of block5_pool with the pretrained block5 (B, 512).
    fn gap(&self, idx: &[usize]) -> Array2<f32>;
    /// block4_pool (B, S/16, S/16, 512).
    fn block4(&self, idx: &[usize]) -> Array4<f32>;
}

/// From the activation cache (memory-mapped).
pub struct Cached<'a>(pub &'a Cache);

impl Features for Cached<'_> {
    fn labels(&self) -> &[u8] {
        &self.0.labels
    }
    fn gap(&self, idx: &[usize]) -> Array2<f32> {
        self.0.gap_rows(idx)
    }
    fn block4(&self, idx: &[usize]) -> Array4<f32> {
        self.0.block4(idx)
    }
}

/// Recomputed from the images every time (`--no-cache`).
pub struct Live<'a> {
    pub model: &'a Vgg16,
    pub data: &'a Dataset,
    pub size: usize,
    pub records: usize,
}

impl Features for Live<'_> {
    fn labels(&self) -> &[u8] {
        &self.data.labels[..self.records]
    }
    fn gap(&self, idx: &[usize]) -> Array2<f32> {
        self.in_sub_batches(idx, |net, x| net.features(x))
    }
    fn block4(&self, idx: &[usize]) -> Array4<f32> {
        self.in_sub_batches(idx, |net, x| net.forward_range(x, 0..BLOCK5_START, &mut |_, _| {}))
    }
}

impl Live<'_> {
    /// `f` on the preprocessed records `idx`, in sub-batches of
    /// auto_batch(S) images (memory stays bounded at 224 px whatever the
    /// training batch size), kernels packed once; results joined along the
    /// batch axis.
    fn in_sub_batches<D: ndarray::RemoveAxis>(
        &self,
        idx: &[usize],
        f: impl Fn(&Prepared, Array4<f32>) -> ndarray::Array<f32, D>,
    ) -> ndarray::Array<f32, D> {
        let net = self.model.prepare();
        let parts: Vec<_> = idx
            .chunks(auto_batch(self.size))
            .map(|c| {
                let recs: Vec<&[u8]> = c.iter().map(|&i| self.data.image(i)).collect();
                f(&net, preprocess_batch(&recs, self.size))
            })
            .collect();
        let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
        ndarray::concatenate(ndarray::Axis(0), &views).expect("sub-batches agree on shape")
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageConfig {
    pub lr: f64,
    pub momentum: f64,
    pub batch_size: usize,
    pub epochs: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub image_size: usize,
    pub stage1: StageConfig,
    pub stage2: StageConfig,
    pub hidden: Option<usize>,
    pub dropout: f32,
    pub seed: u64,
    pub classes: usize,
    /// Which records: the first N of each split, and the held-out fraction
    /// of the training records used for validation (None: validate on the
    /// test split). Kept here so `--resume` uses the same data.
    #[serde(default)]
    pub limit_train: Option<usize>,
    #[serde(default)]
    pub limit_test: Option<usize>,
    #[serde(default)]
    pub validation_split: Option<f64>,
}

/// One row of history.csv.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub stage: u8,
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub seconds: f64,
    pub images_per_second: f64,
}

pub const HISTORY_HEADER: &str =
    "stage,epoch,train_loss,train_accuracy,val_loss,val_accuracy,seconds,images_per_second";

/// Everything that changes during training: what a checkpoint holds.
#[derive(Clone, Debug)]
pub struct State {
    pub block5: Vec<ConvParams>,
    pub head: Head,
    /// Velocities of the stage in progress (block5's are empty in stage 1).
    pub v_block5: Vec<ConvParams>,
    pub v_head: Head,
    /// Stage and epochs completed in it (stage 1 with 0 epochs: fresh).
    pub stage: u8,
    pub epochs_done: usize,
    pub history: Vec<EpochRecord>,
    /// Test metrics at the end of each finished stage.
    pub stage_results: Vec<StageResult>,
    /// Test logits at the end of each stage finished in this process (for
    /// the confusion matrix; not checkpointed).
    pub test_logits: Vec<(u8, Array2<f32>)>,
    /// Logits of the latest validation pass (not checkpointed).
    pub last_val_logits: Option<Array2<f32>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageResult {
    pub stage: u8,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub seconds: f64,
    pub epochs: usize,
    pub images_per_second: f64,
}

fn zeros_like_convs(p: &[ConvParams]) -> Vec<ConvParams> {
    p.iter()
        .map(|c| ConvParams {
            w: Array4::zeros(c.w.dim()),
            b: ndarray::Array1::zeros(c.b.len()),
        })
        .collect()
}

impl State {
    /// A fresh run: pretrained block5, glorot head.
    pub fn new(base: &Vgg16, cfg: &TrainConfig) -> State {
        let block5: Vec<ConvParams> = base.convs[10..13].to_vec();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let head = Head::new(&mut rng, cfg.hidden, cfg.dropout, cfg.classes);
        State {
            v_block5: vec![],
            v_head: head.zeros_like(),
            block5,
            head,
            stage: 1,
            epochs_done: 0,
            history: vec![],
            stage_results: vec![],
            test_logits: vec![],
            last_val_logits: None,
        }
    }
}

/// The RNG for (seed, stage, epoch, stream): 0 = shuffle, 1 = dropout.
fn stream(seed: u64, stage: u8, epoch: usize, which: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(((stage as u64) << 40) | ((epoch as u64) << 8) | which);
    r
}

/// Logits of the records `idx`, computed `batch` at a time by `logits_of`
/// (which maps a chunk of record indices to its (chunk, classes) logits).
pub fn batched_logits(
    idx: &[usize],
    batch: usize,
    classes: usize,
    mut logits_of: impl FnMut(&[usize]) -> Array2<f32>,
) -> Array2<f32> {
    let batch = batch.max(1);
    let mut all = Array2::<f32>::zeros((idx.len(), classes));
    for (bi, chunk) in idx.chunks(batch).enumerate() {
        all.slice_mut(ndarray::s![bi * batch..bi * batch + chunk.len(), ..])
            .assign(&logits_of(chunk));
    }
    all
}

/// Mean loss, accuracy and logits over `idx` (no dropout), head only.
pub fn evaluate_stage1(head: &Head, feats: &dyn Features, idx: &[usize], batch: usize) -> (f64, f64, Array2<f32>) {
    let logits = batched_logits(idx, batch, head.out.b.len(), |c| {
        head_forward(head, feats.gap(c).view(), None).0
    });
    let (l, a) = loss_acc(&logits, feats.labels(), idx);
    (l, a, logits)
}

/// Same, through block5 (stage 2 weights).
pub fn evaluate_stage2(
    block5: &[ConvParams],
    head: &Head,
    feats: &dyn Features,
    idx: &[usize],
    batch: usize,
) -> (f64, f64, Array2<f32>) {
    let logits = batched_logits(idx, batch, head.out.b.len(), |c| {
        head_forward(head, block5_features(block5, feats.block4(c).view()).view(), None).0
    });
    let (l, a) = loss_acc(&logits, feats.labels(), idx);
    (l, a, logits)
}

fn evaluate(state: &State, stage: u8, f: &dyn Features, idx: &[usize]) -> (f64, f64, Array2<f32>) {
    if stage == 1 {
        evaluate_stage1(&state.head, f, idx, 256)
    } else {
        evaluate_stage2(&state.block5, &state.head, f, idx, 64)
    }
}

pub fn loss_acc(logits: &Array2<f32>, labels: &[u8], idx: &[usize]) -> (f64, f64) {
    let y: Vec<u8> = idx.iter().map(|&i| labels[i]).collect();
    let losses = cross_entropy_per_sample(logits.view(), &y);
    let correct = logits
        .rows()
        .into_iter()
        .zip(&y)
        .filter(|(r, &t)| argmax(r.as_slice().expect("row")) == t as usize)
        .count();
    let n = idx.len().max(1) as f64;
    (losses.iter().map(|&l| l as f64).sum::<f64>() / n, correct as f64 / n)
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Where the run's files go and how it reports.
pub struct RunDir<'a> {
    pub dir: &'a Path,
}

impl RunDir<'_> {
    pub fn write_history(&self, history: &[EpochRecord]) -> Result<()> {
        let mut s = String::from(HISTORY_HEADER);
        s.push('\n');
        for r in history {
            s.push_str(&format!(
                "{},{},{:.6},{:.6},{:.6},{:.6},{:.3},{:.1}\n",
                r.stage,
                r.epoch,
                r.train_loss,
                r.train_accuracy,
                r.val_loss,
                r.val_accuracy,
                r.seconds,
                r.images_per_second
            ));
        }
        let p = self.dir.join("history.csv");
        crate::atomic_write(&p, |f| f.write_all(s.as_bytes())).with_context(|| format!("cannot write {}", p.display()))
    }
}

/// Inputs of a training run.
pub struct Inputs<'a> {
    pub train: &'a dyn Features,
    pub train_idx: &'a [usize],
    pub val: &'a dyn Features,
    pub val_idx: &'a [usize],
    /// The test split, for the end-of-stage test metrics; None when the
    /// validation set already is the test split (then its last epoch's
    /// numbers are the test metrics).
    pub test: Option<(&'a dyn Features, &'a [usize])>,
}

/// Called after every epoch with the state to checkpoint.
pub type OnEpoch<'a> = dyn FnMut(&State) -> Result<()> + 'a;

/// Runs (or continues) the recipe from `state` to the end.
pub fn run(cfg: &TrainConfig, inputs: &Inputs, state: &mut State, on_epoch: &mut OnEpoch) -> Result<()> {
    if inputs.train_idx.is_empty() {
        bail!("no training records");
    }
    for stage in [1u8, 2] {
        if state.stage > stage {
            continue;
        }
        let sc = if stage == 1 { cfg.stage1 } else { cfg.stage2 };
        if state.stage < stage {
            // Entering stage 2: a fresh optimizer.
            state.stage = stage;
            state.epochs_done = 0;
        }
        if stage == 2 && state.v_block5.is_empty() {
            state.v_block5 = zeros_like_convs(&state.block5);
            state.v_head = state.head.zeros_like();
        }
        let mut stage_images = 0usize;
        let mut stage_train_secs = 0.0;
        while state.epochs_done < sc.epochs {
            let epoch = state.epochs_done + 1;
            let t0 = Instant::now();
            let (tl, ta) = train_epoch(cfg, &sc, inputs, state, stage, epoch)?;
            let train_secs = t0.elapsed().as_secs_f64();
            let (vl, va) = if inputs.val_idx.is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                let (l, a, logits) = evaluate(state, stage, inputs.val, inputs.val_idx);
                state.last_val_logits = Some(logits);
                (l, a)
            };
            let secs = t0.elapsed().as_secs_f64();
            stage_images += inputs.train_idx.len();
            stage_train_secs += train_secs;
            let rec = EpochRecord {
                stage,
                epoch,
                train_loss: tl,
                train_accuracy: ta,
                val_loss: vl,
                val_accuracy: va,
                seconds: secs,
                images_per_second: inputs.train_idx.len() as f64 / train_secs.max(1e-9),
            };
            eprintln!(
                "stage {stage} epoch {epoch}/{}: loss {tl:.4} acc {ta:.4} | val_loss {vl:.4} val_acc {va:.4} | {secs:.1} s, {:.0} img/s",
                sc.epochs, rec.images_per_second
            );
            state.history.push(rec);
            state.epochs_done = epoch;
            on_epoch(state)?;
        }
        if state.stage_results.iter().all(|r| r.stage != stage) {
            // The validation set is the test split unless `test` is given;
            // then its last pass already holds the test metrics.
            let (f, idx) = inputs.test.unwrap_or((inputs.val, inputs.val_idx));
            let reuse = inputs.test.is_none() && state.last_val_logits.is_some();
            let (tl, ta, logits) = if reuse {
                let logits = state.last_val_logits.take().expect("checked");
                let (l, a) = loss_acc(&logits, f.labels(), idx);
                (l, a, logits)
            } else {
                evaluate(state, stage, f, idx)
            };
            state.test_logits.push((stage, logits));
            let secs: f64 = state
                .history
                .iter()
                .filter(|r| r.stage == stage)
                .map(|r| r.seconds)
                .sum();
            state.stage_results.push(StageResult {
                stage,
                test_loss: tl,
                test_accuracy: ta,
                seconds: secs,
                epochs: sc.epochs,
                images_per_second: if stage_train_secs > 0.0 {
                    stage_images as f64 / stage_train_secs
                } else {
                    f64::NAN
                },
            });
            eprintln!("stage {stage} done: test accuracy {ta:.4}, test loss {tl:.4}");
            on_epoch(state)?;
        }
    }
    Ok(())
}

/// One epoch of one stage; returns (mean train loss, train accuracy).
fn train_epoch(
    cfg: &TrainConfig,
    sc: &StageConfig,
    inputs: &Inputs,
    state: &mut State,
    stage: u8,
    epoch: usize,
) -> Result<(f64, f64)> {
    let mut order = inputs.train_idx.to_vec();
    order.shuffle(&mut stream(cfg.seed, stage, epoch, 0));
    let mut drop_rng = stream(cfg.seed, stage, epoch, 1);
    let labels = inputs.train.labels();
    let mut progress = Progress::new(
        &format!("stage {stage} epoch {epoch}/{}", sc.epochs),
        order.len() as u64,
        "img",
    );
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
    for batch in order.chunks(sc.batch_size.max(1)) {
        let y: Vec<u8> = batch.iter().map(|&i| labels[i]).collect();
        let (loss, logits) = if stage == 1 {
            let g = inputs.train.gap(batch);
            let (logits, acts) = head_forward(&state.head, g.view(), Some(&mut drop_rng));
            let (loss, dlogits) = softmax_cross_entropy(logits.view(), &y);
            let (_, gh) = head_backward(&state.head, &acts, dlogits.view());
            step_head(&mut state.head, &mut state.v_head, &gh, sc);
            (loss, logits)
        } else {
            let x4 = inputs.train.block4(batch);
            let (g, b5) = block5_forward(&state.block5, x4);
            let (logits, acts) = head_forward(&state.head, g.view(), Some(&mut drop_rng));
            let (loss, dlogits) = softmax_cross_entropy(logits.view(), &y);
            let (dg, gh) = head_backward(&state.head, &acts, dlogits.view());
            let gconv = block5_backward(&state.block5, &b5, dg.view());
            step_head(&mut state.head, &mut state.v_head, &gh, sc);
            for ((p, v), g) in state.block5.iter_mut().zip(state.v_block5.iter_mut()).zip(&gconv) {
                let owned = "owned arrays are contiguous";
                step(
                    p.w.as_slice_mut().expect(owned),
                    v.w.as_slice_mut().expect(owned),
                    g.dw.as_slice().expect(owned),
                    sc,
                );
                step(
                    p.b.as_slice_mut().expect(owned),
                    v.b.as_slice_mut().expect(owned),
                    g.db.as_slice().expect(owned),
                    sc,
                );
            }
            (loss, logits)
        };
        if !loss.is_finite() {
            bail!("stage {stage} epoch {epoch}: the loss became {loss} (diverged); try a smaller learning rate");
        }
        loss_sum += loss as f64 * batch.len() as f64;
        correct += logits
            .rows()
            .into_iter()
            .zip(&y)
            .filter(|(r, &t)| argmax(r.as_slice().expect("row")) == t as usize)
            .count();
        seen += batch.len();
        progress.inc(
            batch.len() as u64,
            &format!(
                "loss {:.4} acc {:.4}",
                loss_sum / seen as f64,
                correct as f64 / seen as f64
            ),
        );
    }
    progress.finish();
    Ok((loss_sum / seen.max(1) as f64, correct as f64 / seen.max(1) as f64))
}

/// One SGD step of the stage's optimizer on one tensor.
fn step(w: &mut [f32], v: &mut [f32], g: &[f32], sc: &StageConfig) {
    sgd_momentum_step(w, v, g, sc.lr as f32, sc.momentum as f32);
}

fn step_head(head: &mut Head, v: &mut Head, g: &Head, sc: &StageConfig) {
    for ((w, vv), (_, gg, _)) in head.tensors_mut().into_iter().zip(v.tensors_mut()).zip(g.tensors()) {
        step(w, vv, gg, sc);
    }
}

// ------------------------------------------------------------ checkpoints

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    format_version: u32,
    config: TrainConfig,
    stage: u8,
    epochs_done: usize,
    history: Vec<EpochRecord>,
    stage_results: Vec<StageResult>,
    has_block5_velocity: bool,
}

const CHECKPOINT_VERSION: u32 = 1;

/// Writes checkpoint.npz (parameters and velocities) and checkpoint.json,
/// each atomically; the JSON, written last, is what makes it count.
pub fn save_checkpoint(dir: &Path, cfg: &TrainConfig, s: &State) -> Result<()> {
    let npz = dir.join("checkpoint.npz");
    crate::atomic_write(&npz, |f| {
        let mut w = ndarray_npy::NpzWriter::new(std::io::BufWriter::new(f));
        let mut add = |name: String, a: ArrayD<f32>| w.add_array(name, &a).map_err(std::io::Error::other);
        for (i, (p, name)) in s.block5.iter().zip(conv5_names()).enumerate() {
            add(format!("{name}/kernel"), p.w.clone().into_dyn())?;
            add(format!("{name}/bias"), p.b.clone().into_dyn())?;
            if let Some(v) = s.v_block5.get(i) {
                add(format!("velocity/{name}/kernel"), v.w.clone().into_dyn())?;
                add(format!("velocity/{name}/bias"), v.b.clone().into_dyn())?;
            }
        }
        for ((name, data, shape), (_, vdata, _)) in s.head.tensors().into_iter().zip(s.v_head.tensors()) {
            add(
                name.to_string(),
                ArrayD::from_shape_vec(shape.clone(), data.to_vec()).expect("shape"),
            )?;
            add(
                format!("velocity/{name}"),
                ArrayD::from_shape_vec(shape, vdata.to_vec()).expect("shape"),
            )?;
        }
        let mut inner = w.finish().map_err(std::io::Error::other)?;
        inner.flush()
    })
    .with_context(|| format!("cannot write {}", npz.display()))?;
    let meta = CheckpointMeta {
        format_version: CHECKPOINT_VERSION,
        config: cfg.clone(),
        stage: s.stage,
        epochs_done: s.epochs_done,
        history: s.history.clone(),
        stage_results: s.stage_results.clone(),
        has_block5_velocity: !s.v_block5.is_empty(),
    };
    let json = serde_json::to_vec_pretty(&meta)?;
    let p = dir.join("checkpoint.json");
    crate::atomic_write(&p, |f| f.write_all(&json)).with_context(|| format!("cannot write {}", p.display()))
}

pub fn conv5_names() -> [&'static str; 3] {
    [
        LAYERS[BLOCK5_START].name,
        LAYERS[BLOCK5_START + 1].name,
        LAYERS[BLOCK5_START + 2].name,
    ]
}

/// Reads a checkpoint written by [`save_checkpoint`]; returns the config
/// it was made with and the state.
pub fn load_checkpoint(dir: &Path) -> Result<(TrainConfig, State)> {
    let jp = dir.join("checkpoint.json");
    let text =
        std::fs::read_to_string(&jp).with_context(|| format!("{}: no checkpoint to resume from", jp.display()))?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).with_context(|| format!("{}: not a checkpoint", jp.display()))?;
    if meta.format_version != CHECKPOINT_VERSION {
        bail!(
            "{}: checkpoint format {} (this program reads {CHECKPOINT_VERSION})",
            jp.display(),
            meta.format_version
        );
    }
    let np = dir.join("checkpoint.npz");
    let mut r =
        ndarray_npy::NpzReader::new(std::fs::File::open(&np).with_context(|| format!("cannot open {}", np.display()))?)
            .with_context(|| format!("{}: not an npz", np.display()))?;
    let mut get = |name: &str| -> Result<ArrayD<f32>> {
        r.by_name(name)
            .with_context(|| format!("{}: missing or bad array {name}", np.display()))
    };
    let mut block5 = Vec::new();
    let mut v_block5 = Vec::new();
    for name in conv5_names() {
        let w = get(&format!("{name}/kernel"))?.into_dimensionality()?;
        let b = get(&format!("{name}/bias"))?.into_dimensionality()?;
        block5.push(ConvParams { w, b });
        if meta.has_block5_velocity {
            let w = get(&format!("velocity/{name}/kernel"))?.into_dimensionality()?;
            let b = get(&format!("velocity/{name}/bias"))?.into_dimensionality()?;
            v_block5.push(ConvParams { w, b });
        }
    }
    let cfg = meta.config;
    let mut head = Head::new(&mut ChaCha8Rng::seed_from_u64(0), cfg.hidden, cfg.dropout, cfg.classes);
    let mut v_head = head.zeros_like();
    let names: Vec<&'static str> = head.tensors().into_iter().map(|(n, _, _)| n).collect();
    for ((name, w), v) in names.iter().zip(head.tensors_mut()).zip(v_head.tensors_mut()) {
        let a = get(name)?;
        let va = get(&format!("velocity/{name}"))?;
        if a.len() != w.len() || va.len() != v.len() {
            bail!("{}: {name} has {} values, expected {}", np.display(), a.len(), w.len());
        }
        w.copy_from_slice(a.as_slice().context("contiguous")?);
        v.copy_from_slice(va.as_slice().context("contiguous")?);
    }
    let state = State {
        block5,
        head,
        v_block5,
        v_head,
        stage: meta.stage,
        epochs_done: meta.epochs_done,
        history: meta.history,
        stage_results: meta.stage_results,
        test_logits: vec![],
        last_val_logits: None,
    };
    Ok((cfg, state))
}
