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

use crate::config::{StageConfig, TrainConfig};
use crate::error::{Error, Result};
use crate::features::{logits_stage1, logits_stage2, Features};
use crate::model::vgg::{ConvParams, Vgg16};
use crate::model::{block5_backward_each, block5_forward, head_backward, head_forward, Block5Kernels, Head, Norm};
use crate::observer::Observer;
use crate::report::history::{EpochRecord, StageResult};
use crate::report::metrics::loss_acc;
use crate::tensor::conv::ConvGrads;
use crate::tensor::ops::{argmax, softmax_cross_entropy, softmax_cross_entropy_smoothed};
use crate::train::optim::sgd_momentum_step;
use crate::train::parallel::{
    gather_rows, part_rows, rank_rows, sum_in_rank_order, sum_segments, Collective, ExchangeClock, Solo,
};
use ndarray::Array2;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

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
    /// The stage's best epoch so far by validation accuracy
    /// (`--restore-best`).
    pub best: Option<Best>,
}

/// A snapshot of the trainable weights at a stage's best epoch.
#[derive(Clone, Debug)]
pub struct Best {
    pub epoch: usize,
    pub val_accuracy: f64,
    pub block5: Vec<ConvParams>,
    pub head: Head,
}

impl State {
    /// A fresh run: pretrained block5, glorot head.
    pub fn new(base: &Vgg16, cfg: &TrainConfig) -> State {
        let block5: Vec<ConvParams> = base.block5().to_vec();
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
            best: None,
        }
    }
}

/// The RNG for (seed, stage, epoch, stream): 0 = shuffle, 1 = dropout.
fn stream(seed: u64, stage: u8, epoch: usize, which: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(((stage as u64) << 40) | ((epoch as u64) << 8) | which);
    r
}

/// Whether `record` is seen mirrored in (stage, epoch): a fair coin from
/// the seed (SplitMix64 of the four), the same on resume and for any
/// batch make-up.
pub fn flipped(seed: u64, stage: u8, epoch: usize, record: usize) -> bool {
    let mut z =
        seed ^ ((stage as u64) << 56) ^ ((epoch as u64) << 40) ^ (record as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 1 == 1
}

/// Rows of `batch` from two sources: row j from `flipped_src` where
/// `flips[j]`, else from `plain_src` (each asked only for its own rows).
fn mixed<D: ndarray::RemoveAxis>(
    batch: &[usize],
    flips: &[bool],
    plain_src: impl Fn(&[usize]) -> Result<ndarray::Array<f32, D>>,
    flipped_src: impl Fn(&[usize]) -> Result<ndarray::Array<f32, D>>,
) -> Result<ndarray::Array<f32, D>> {
    let (fl, pl): (Vec<usize>, Vec<usize>) = (0..batch.len()).partition(|&j| flips[j]);
    if fl.is_empty() {
        return plain_src(batch);
    }
    let pick = |js: &[usize]| js.iter().map(|&j| batch[j]).collect::<Vec<_>>();
    let f = flipped_src(&pick(&fl))?;
    if pl.is_empty() {
        return Ok(f);
    }
    let p = plain_src(&pick(&pl))?;
    let mut dim = f.raw_dim();
    dim[0] = batch.len();
    let mut out = ndarray::Array::<f32, D>::zeros(dim);
    for (src, js) in [(&p, &pl), (&f, &fl)] {
        for (row, &j) in js.iter().enumerate() {
            out.index_axis_mut(ndarray::Axis(0), j)
                .assign(&src.index_axis(ndarray::Axis(0), row));
        }
    }
    Ok(out)
}

/// Mean loss, accuracy and logits over `idx` with the stage's model; with
/// several ranks, each computes whole batches of its share
/// ([`rank_rows`]) and the logits are gathered to all.
fn evaluate(
    state: &State,
    stage: u8,
    f: &dyn Features,
    idx: &[usize],
    comm: &dyn Collective,
) -> Result<(f64, f64, Array2<f32>)> {
    let batch = if stage == 1 { 256 } else { 64 };
    let mine = &idx[rank_rows(idx.len(), batch, comm.rank(), comm.size())];
    let logits = if stage == 1 {
        logits_stage1(&state.head, f, mine, batch)?
    } else {
        logits_stage2(&state.block5, &state.head, f, mine, batch)?
    };
    let logits = if comm.size() > 1 {
        let width = state.head.out.b.len();
        let all = gather_rows(comm, logits.as_slice().expect("fresh"), idx.len(), width, batch)?;
        Array2::from_shape_vec((idx.len(), width), all).expect("gathered rows")
    } else {
        logits
    };
    let (l, a) = loss_acc(&logits, f.labels(), idx);
    Ok((l, a, logits))
}

/// Inputs of a training run.
pub struct Inputs<'a> {
    pub train: &'a dyn Features,
    /// The training records mirrored (`flip`): each record's view is drawn
    /// per epoch by [`flipped`].
    pub train_flipped: Option<&'a dyn Features>,
    pub train_idx: &'a [usize],
    pub val: &'a dyn Features,
    pub val_idx: &'a [usize],
    /// The test split, for the end-of-stage test metrics; None when the
    /// validation set already is the test split (then its last epoch's
    /// numbers are the test metrics).
    pub test: Option<(&'a dyn Features, &'a [usize])>,
}

/// Called after every epoch, and after each stage's test, with the state
/// to checkpoint.
pub type OnEpoch<'a> = dyn FnMut(&State) -> Result<()> + 'a;

/// Runs (or continues) the recipe from `state` to the end, reporting to
/// `obs`, in one process.
pub fn run(
    cfg: &TrainConfig,
    inputs: &Inputs,
    state: &mut State,
    on_epoch: &mut OnEpoch,
    obs: &mut dyn Observer,
) -> Result<()> {
    run_parallel(cfg, inputs, state, on_epoch, obs, &Solo)
}

/// [`run`] as one of `comm.size()` ranks ([`crate::train::parallel`]):
/// every rank calls it with the same configuration and inputs; each
/// computes its parts of every batch and its share of every evaluation,
/// and all end with the same state. `on_epoch` runs on every rank (the
/// caller decides who writes files).
pub fn run_parallel(
    cfg: &TrainConfig,
    inputs: &Inputs,
    state: &mut State,
    on_epoch: &mut OnEpoch,
    obs: &mut dyn Observer,
    comm: &dyn Collective,
) -> Result<()> {
    if inputs.train_idx.is_empty() {
        crate::config_bail!("no training records");
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
            state.best = None;
        }
        if stage == 1 && state.epochs_done == 0 && cfg.standardize && state.head.norm.is_none() {
            // The head sees standardized features: statistics of the
            // training records' stage-1 features, fixed from here on.
            let norm = Norm::of(inputs.train.gap(inputs.train_idx)?.view());
            state.head.norm = Some(norm.clone());
            state.v_head.norm = Some(norm);
        }
        if stage == 2 && state.v_block5.is_empty() {
            state.v_block5 = state.block5.iter().map(ConvParams::zeros_like).collect();
            state.v_head = state.head.zeros_like();
        }
        let mut stage_images = 0usize;
        let mut stage_train_secs = 0.0;
        while state.epochs_done < sc.epochs {
            let epoch = state.epochs_done + 1;
            let t0 = Instant::now();
            let (tl, ta) = train_epoch(cfg, &sc, inputs, state, stage, epoch, obs, comm)?;
            let train_secs = t0.elapsed().as_secs_f64();
            let (vl, va) = if inputs.val_idx.is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                let (l, a, logits) = evaluate(state, stage, inputs.val, inputs.val_idx, comm)?;
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
            obs.epoch(&rec, sc.epochs);
            if cfg.restore_best && va.is_finite() && state.best.as_ref().is_none_or(|b| va > b.val_accuracy) {
                state.best = Some(Best {
                    epoch,
                    val_accuracy: va,
                    block5: state.block5.clone(),
                    head: state.head.clone(),
                });
            }
            state.history.push(rec);
            state.epochs_done = epoch;
            on_epoch(state)?;
        }
        if state.stage_results.iter().all(|r| r.stage != stage) {
            if let Some(b) = state.best.take() {
                if b.epoch != sc.epochs {
                    obs.info(&format!(
                        "stage {stage}: back to epoch {} (best validation accuracy {:.4})",
                        b.epoch, b.val_accuracy
                    ));
                    state.block5 = b.block5;
                    state.head = b.head;
                    state.last_val_logits = None;
                }
            }
            // The validation set is the test split unless `test` is given;
            // then its last pass already holds the test metrics.
            let (f, idx) = inputs.test.unwrap_or((inputs.val, inputs.val_idx));
            let reuse = inputs.test.is_none() && state.last_val_logits.is_some();
            let (tl, ta, logits) = if reuse {
                let logits = state.last_val_logits.take().expect("checked");
                let (l, a) = loss_acc(&logits, f.labels(), idx);
                (l, a, logits)
            } else {
                evaluate(state, stage, f, idx, comm)?
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
            obs.stage_done(state.stage_results.last().expect("just pushed"));
            on_epoch(state)?;
        }
    }
    Ok(())
}

/// One epoch of one stage; returns (mean train loss, train accuracy).
#[allow(clippy::too_many_arguments)]
fn train_epoch(
    cfg: &TrainConfig,
    sc: &StageConfig,
    inputs: &Inputs,
    state: &mut State,
    stage: u8,
    epoch: usize,
    obs: &mut dyn Observer,
    comm: &dyn Collective,
) -> Result<(f64, f64)> {
    let mut order = inputs.train_idx.to_vec();
    order.shuffle(&mut stream(cfg.seed, stage, epoch, 0));
    let mut drop_rng = stream(cfg.seed, stage, epoch, 1);
    let labels = inputs.train.labels();
    obs.begin(
        &format!("stage {stage} epoch {epoch}/{}", sc.epochs),
        order.len() as u64,
        "img",
    );
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
    let per_epoch = order.len().div_ceil(sc.batch_size.max(1));
    let parts = comm.size() * cfg.accumulate.max(1);
    let mut clock = ExchangeClock::default();
    // Block5's prepared kernels: made by each step's first forward, kept
    // for the step's parts, refilled after each update.
    let mut kernels = Block5Kernels::new();
    for (bi, batch) in order.chunks(sc.batch_size.max(1)).enumerate() {
        let y: Vec<u8> = batch.iter().map(|&i| labels[i]).collect();
        let opt = Step {
            lr: sc.lr_at((epoch - 1) * per_epoch + bi, sc.epochs * per_epoch, per_epoch) as f32,
            momentum: sc.momentum as f32,
            weight_decay: sc.weight_decay as f32,
        };
        let flips: Vec<bool> = match inputs.train_flipped {
            Some(_) => batch.iter().map(|&i| flipped(cfg.seed, stage, epoch, i)).collect(),
            None => vec![false; batch.len()],
        };
        let (loss, right) = if parts == 1 {
            // The whole batch at once: the seed recipe, exactly.
            let g = batch_grads(
                cfg,
                inputs,
                state,
                stage,
                batch,
                &flips,
                &y,
                1.0,
                &mut drop_rng,
                &mut kernels,
                &mut |_| {},
            )?;
            opt.apply(state, &g.head, &g.conv);
            (g.loss, g.correct)
        } else {
            let flat = step_parts(
                cfg,
                inputs,
                state,
                stage,
                batch,
                &flips,
                &y,
                &mut drop_rng,
                &mut kernels,
                comm,
                &mut clock,
            )?;
            let n = flat.len();
            opt.apply_flat(state, stage, &flat[..n - 2]);
            (flat[n - 2] / batch.len() as f32, flat[n - 1].round() as usize)
        };
        // The step changed block5: its next forward prepares the kernels anew.
        kernels.weights_changed();
        if !loss.is_finite() {
            obs.end();
            return Err(Error::Diverged { stage, epoch, loss });
        }
        loss_sum += loss as f64 * batch.len() as f64;
        correct += right;
        seen += batch.len();
        obs.advance(
            batch.len() as u64,
            &format!(
                "loss {:.4} acc {:.4}",
                loss_sum / seen as f64,
                correct as f64 / seen as f64
            ),
        );
    }
    obs.end();
    if let Some(line) = clock.summary() {
        obs.info(&format!("stage {stage} epoch {epoch}: {line}"));
    }
    Ok((loss_sum / seen.max(1) as f64, correct as f64 / seen.max(1) as f64))
}

/// One step's gradients over the parts of `batch` ([`part_rows`]): this
/// rank's parts r*K..(r+1)*K computed one after another and summed in
/// order, then summed over ranks in rank order (train::parallel). Returns
/// the [`flatten`]ed sum with the summed loss (times rows) and correct
/// count appended.
///
/// With [`Collective::overlap`], the rank's last part runs on a helper
/// thread while this thread sums each gradient over ranks as soon as
/// backward has produced it (the head's, then conv5_3's, conv5_2's,
/// conv5_1's), so the exchange of the upper layers travels while the lower
/// layers still compute. Every element is summed in the same order either
/// way: the two are bit-identical.
#[allow(clippy::too_many_arguments)]
fn step_parts(
    cfg: &TrainConfig,
    inputs: &Inputs,
    state: &State,
    stage: u8,
    batch: &[usize],
    flips: &[bool],
    y: &[u8],
    drop_rng: &mut ChaCha8Rng,
    kernels: &mut Block5Kernels,
    comm: &dyn Collective,
    clock: &mut ExchangeClock,
) -> Result<Vec<f32>> {
    let k = cfg.accumulate.max(1);
    let parts = comm.size() * k;
    let mine = comm.rank() * k..(comm.rank() + 1) * k;
    let lay = Layout::of(state, stage);
    let last_mine = mine
        .clone()
        .rev()
        .find(|&p| !part_rows(batch.len(), parts, p).is_empty());
    let overlap = comm.overlap();
    let mut acc: Option<Vec<f32>> = None;
    let mut summed: Option<Vec<f32>> = None;
    for p in 0..parts {
        let rows = part_rows(batch.len(), parts, p);
        if !mine.contains(&p) {
            // Another rank's rows: draw their dropout masks anyway, so this
            // rank's draws are the ones one process makes.
            for _ in 0..state.head.dropout_draws(rows.len()) {
                rand::Rng::gen::<f32>(drop_rng);
            }
            continue;
        }
        if rows.is_empty() {
            continue;
        }
        let scale = rows.len() as f32 / batch.len() as f32;
        let (b, f, yy) = (&batch[rows.clone()], &flips[rows.clone()], &y[rows.clone()]);
        if overlap && Some(p) == last_mine {
            summed = Some(overlapped(
                &lay,
                acc.take(),
                comm,
                clock,
                |ready: &mut dyn FnMut(Ready)| {
                    batch_grads(cfg, inputs, state, stage, b, f, yy, scale, drop_rng, kernels, ready)
                },
            )?);
            continue;
        }
        let g = batch_grads(
            cfg,
            inputs,
            state,
            stage,
            b,
            f,
            yy,
            scale,
            drop_rng,
            kernels,
            &mut |_| {},
        )?;
        let (l, c) = (g.loss * rows.len() as f32, g.correct as f32);
        match acc.as_mut() {
            None => {
                let mut flat = Vec::with_capacity(lay.len + 2);
                flatten(&g.head, &g.conv, &mut flat);
                flat.extend([l, c]);
                acc = Some(flat);
            }
            Some(a) => {
                add_flat(a, &g.head, &g.conv);
                a[lay.len] += l;
                a[lay.len + 1] += c;
            }
        }
    }
    if let Some(flat) = summed {
        return Ok(flat);
    }
    // A rank whose parts were all empty (a last batch smaller than the part
    // count) adds zeros.
    let mut flat = acc.unwrap_or_else(|| vec![0.0; lay.len + 2]);
    let t0 = Instant::now();
    if overlap {
        // The others sum segment by segment: the same calls, in order.
        let mut k = 0;
        let (segs, _) = sum_segments(comm, lay.segments(), || {
            k += 1;
            Some(lay.segment(k - 1, &flat))
        })?;
        let segs = segs.expect("every segment given");
        for (k, seg) in segs.iter().enumerate() {
            lay.place(k, seg, &mut flat);
        }
    } else {
        sum_in_rank_order(comm, &mut flat)?;
    }
    if comm.size() > 1 {
        clock.add(t0.elapsed(), t0.elapsed(), false);
    }
    Ok(flat)
}

/// The last part of a step with its exchange overlapped ([`step_parts`]):
/// `grads` (the part's [`batch_grads`], handing over each gradient as it
/// is ready) runs on a helper thread; this thread adds each gradient to
/// the earlier parts' sum `acc` and sums it over ranks.
fn overlapped<F>(
    lay: &Layout,
    acc: Option<Vec<f32>>,
    comm: &dyn Collective,
    clock: &mut ExchangeClock,
    grads: F,
) -> Result<Vec<f32>>
where
    F: FnOnce(&mut dyn FnMut(Ready)) -> Result<Grads> + Send,
{
    let mut flat = vec![0.0f32; lay.len + 2];
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<f32>>();
        let acc = &acc;
        let worker = s.spawn(move || -> Result<Instant> {
            let mut seg = 0;
            grads(&mut |r: Ready| {
                // This part's gradient, plus the earlier parts' sum.
                let mut m = Vec::with_capacity(lay.segment_len(seg));
                match r {
                    Ready::Head(head, loss, correct, rows) => {
                        for (_, t, _) in head.tensors() {
                            m.extend_from_slice(t);
                        }
                        m.extend([loss * rows as f32, correct as f32]);
                    }
                    Ready::Conv(g) => {
                        m.extend_from_slice(g.dw.as_slice().expect("owned"));
                        m.extend_from_slice(g.db.as_slice().expect("owned"));
                    }
                }
                if let Some(a) = acc {
                    for (x, e) in m.iter_mut().zip(lay.segment(seg, a)) {
                        *x += e; // = e + x: IEEE addition commutes, bit for bit
                    }
                }
                seg += 1;
                // A closed channel means this thread's caller has failed;
                // its error is the one to report.
                let _ = tx.send(m);
            })?;
            Ok(Instant::now())
        });
        let summed = sum_segments(comm, lay.segments(), || rx.recv().ok());
        let t1 = Instant::now();
        let computed = worker.join().expect("the gradient thread panicked")?;
        let (segs, busy) = summed?;
        let segs = segs.ok_or_else(|| Error::Config("backward ended before handing over every gradient".into()))?;
        for (k, seg) in segs.iter().enumerate() {
            lay.place(k, seg, &mut flat);
        }
        clock.add(busy, t1.saturating_duration_since(computed), true);
        Ok(())
    })?;
    Ok(flat)
}

/// Where each gradient sits in the [`flatten`]ed buffer (the head's
/// tensors, then each block5 layer's dW and db, then loss and correct
/// count), and the segments the overlapped exchange sums in backward's
/// order: segment 0 the head with loss and count, then conv5_3, conv5_2,
/// conv5_1.
struct Layout {
    head: usize,
    conv: Vec<std::ops::Range<usize>>,
    /// Gradient floats, without the two counts.
    len: usize,
}

impl Layout {
    fn of(state: &State, stage: u8) -> Layout {
        let head: usize = state.head.tensors().iter().map(|(_, t, _)| t.len()).sum();
        let mut at = head;
        let conv: Vec<_> = if stage == 2 {
            state
                .block5
                .iter()
                .map(|p| {
                    at += p.w.len() + p.b.len();
                    at - p.w.len() - p.b.len()..at
                })
                .collect()
        } else {
            vec![]
        };
        Layout { head, conv, len: at }
    }

    fn segments(&self) -> usize {
        1 + self.conv.len()
    }

    /// Block5 layer of segment k >= 1 (conv5_3 first).
    fn layer(&self, k: usize) -> std::ops::Range<usize> {
        self.conv[self.conv.len() - k].clone()
    }

    fn segment_len(&self, k: usize) -> usize {
        if k == 0 {
            self.head + 2
        } else {
            self.layer(k).len()
        }
    }

    /// Segment k of a flattened buffer (with its counts), as a copy.
    fn segment(&self, k: usize, flat: &[f32]) -> Vec<f32> {
        if k == 0 {
            [&flat[..self.head], &flat[self.len..self.len + 2]].concat()
        } else {
            flat[self.layer(k)].to_vec()
        }
    }

    /// Writes segment k back into a flattened buffer.
    fn place(&self, k: usize, seg: &[f32], flat: &mut [f32]) {
        if k == 0 {
            flat[..self.head].copy_from_slice(&seg[..self.head]);
            flat[self.len..self.len + 2].copy_from_slice(&seg[self.head..]);
        } else {
            flat[self.layer(k)].copy_from_slice(seg);
        }
    }
}

/// Gradients of one batch (or part of one): the head's, block5's in
/// stage 2, the mean loss over its rows and how many it got right.
struct Grads {
    head: Head,
    conv: Vec<ConvGrads>,
    loss: f32,
    correct: usize,
}

/// A gradient [`batch_grads`] has just computed, in backward's order.
enum Ready<'g> {
    /// The head's, with the part's mean loss, correct count and rows.
    Head(&'g Head, f32, usize, usize),
    /// A block5 layer's: conv5_3's first, then conv5_2's, conv5_1's.
    Conv(&'g ConvGrads),
}

/// Forward and backward over `batch` (rows `y`, views `flips`), the loss
/// gradient scaled by `scale` (a part's share of its batch; 1 for a whole
/// batch); each gradient is also handed to `ready` as soon as it exists.
#[allow(clippy::too_many_arguments)]
fn batch_grads(
    cfg: &TrainConfig,
    inputs: &Inputs,
    state: &State,
    stage: u8,
    batch: &[usize],
    flips: &[bool],
    y: &[u8],
    scale: f32,
    drop_rng: &mut ChaCha8Rng,
    kernels: &mut Block5Kernels,
    ready: &mut dyn FnMut(Ready),
) -> Result<Grads> {
    let loss_fn = |logits: &Array2<f32>, y: &[u8]| {
        let smoothing = if stage == 1 { cfg.stage1 } else { cfg.stage2 }.label_smoothing;
        let (l, mut d) = if smoothing > 0.0 {
            softmax_cross_entropy_smoothed(logits.view(), y, smoothing as f32)
        } else {
            softmax_cross_entropy(logits.view(), y)
        };
        if scale != 1.0 {
            d *= scale;
        }
        (l, d)
    };
    let (plain, mirror) = (inputs.train, inputs.train_flipped.unwrap_or(inputs.train));
    let count = |logits: &Array2<f32>| {
        logits
            .rows()
            .into_iter()
            .zip(y)
            .filter(|(r, &t)| argmax(r.as_slice().expect("row")) == t as usize)
            .count()
    };
    let (loss, correct, head, conv) = if stage == 1 {
        let g = mixed(batch, flips, |b| plain.gap(b), |b| mirror.gap(b))?;
        let (logits, acts) = head_forward(&state.head, g.view(), Some(drop_rng));
        let (loss, dlogits) = loss_fn(&logits, y);
        let correct = count(&logits);
        let (_, gh) = head_backward(&state.head, &acts, dlogits.view());
        ready(Ready::Head(&gh, loss, correct, y.len()));
        (loss, correct, gh, vec![])
    } else {
        let x4 = mixed(batch, flips, |b| plain.block4(b), |b| mirror.block4(b))?;
        let (g, b5) = block5_forward(&state.block5, x4, kernels);
        let (logits, acts) = head_forward(&state.head, g.view(), Some(drop_rng));
        let (loss, dlogits) = loss_fn(&logits, y);
        let correct = count(&logits);
        let (dg, gh) = head_backward(&state.head, &acts, dlogits.view());
        ready(Ready::Head(&gh, loss, correct, y.len()));
        let gconv = block5_backward_each(&state.block5, &b5, dg.view(), kernels, &mut |_, g| {
            ready(Ready::Conv(g))
        });
        (loss, correct, gh, gconv)
    };
    Ok(Grads {
        head,
        conv,
        loss,
        correct,
    })
}

/// The gradients as one flat buffer: the head's tensors, then each conv
/// layer's dW and db.
fn flatten(head: &Head, conv: &[ConvGrads], out: &mut Vec<f32>) {
    for (_, t, _) in head.tensors() {
        out.extend_from_slice(t);
    }
    for g in conv {
        out.extend_from_slice(g.dw.as_slice().expect("owned"));
        out.extend_from_slice(g.db.as_slice().expect("owned"));
    }
}

/// Adds the gradients to a [`flatten`]ed buffer, in place.
fn add_flat(flat: &mut [f32], head: &Head, conv: &[ConvGrads]) {
    let mut at = 0;
    let mut add = |src: &[f32]| {
        for (a, b) in flat[at..at + src.len()].iter_mut().zip(src) {
            *a += b;
        }
        at += src.len();
    };
    for (_, t, _) in head.tensors() {
        add(t);
    }
    for g in conv {
        add(g.dw.as_slice().expect("owned"));
        add(g.db.as_slice().expect("owned"));
    }
}

/// One SGD step's settings: the scheduled rate, momentum, weight decay.
struct Step {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
}

impl Step {
    /// One tensor; kernels (not biases) get `weight_decay * w` added to
    /// their gradient.
    fn tensor(&self, w: &mut [f32], v: &mut [f32], g: &[f32], kernel: bool) {
        if kernel && self.weight_decay > 0.0 {
            let gd: Vec<f32> = g
                .iter()
                .zip(w.iter())
                .map(|(&g, &w)| g + self.weight_decay * w)
                .collect();
            sgd_momentum_step(w, v, &gd, self.lr, self.momentum);
        } else {
            sgd_momentum_step(w, v, g, self.lr, self.momentum);
        }
    }

    /// The step on the head and (stage 2) block5.
    fn apply(&self, state: &mut State, gh: &Head, gconv: &[ConvGrads]) {
        self.head(&mut state.head, &mut state.v_head, gh);
        for ((p, v), g) in state.block5.iter_mut().zip(state.v_block5.iter_mut()).zip(gconv) {
            let owned = "owned arrays are contiguous";
            self.tensor(
                p.w.as_slice_mut().expect(owned),
                v.w.as_slice_mut().expect(owned),
                g.dw.as_slice().expect(owned),
                true,
            );
            self.tensor(
                p.b.as_slice_mut().expect(owned),
                v.b.as_slice_mut().expect(owned),
                g.db.as_slice().expect(owned),
                false,
            );
        }
    }

    /// [`Step::apply`] from [`flatten`]ed gradients.
    fn apply_flat(&self, state: &mut State, stage: u8, flat: &[f32]) {
        let mut at = 0;
        let mut next = |len: usize| {
            at += len;
            &flat[at - len..at]
        };
        let kernels: Vec<bool> = state
            .head
            .tensors()
            .iter()
            .map(|(n, _, _)| n.ends_with("kernel"))
            .collect();
        for ((w, v), kernel) in state
            .head
            .tensors_mut()
            .into_iter()
            .zip(state.v_head.tensors_mut())
            .zip(kernels)
        {
            let g = next(w.len());
            self.tensor(w, v, g, kernel);
        }
        if stage == 2 {
            let owned = "owned arrays are contiguous";
            for (p, v) in state.block5.iter_mut().zip(state.v_block5.iter_mut()) {
                let g = next(p.w.len());
                self.tensor(
                    p.w.as_slice_mut().expect(owned),
                    v.w.as_slice_mut().expect(owned),
                    g,
                    true,
                );
                let g = next(p.b.len());
                self.tensor(
                    p.b.as_slice_mut().expect(owned),
                    v.b.as_slice_mut().expect(owned),
                    g,
                    false,
                );
            }
        }
    }

    fn head(&self, head: &mut Head, v: &mut Head, g: &Head) {
        for ((w, vv), (name, gg, _)) in head.tensors_mut().into_iter().zip(v.tensors_mut()).zip(g.tensors()) {
            self.tensor(w, vv, gg, name.ends_with("kernel"));
        }
    }
}
