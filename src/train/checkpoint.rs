//! Checkpoints: after every epoch, the run directory gets `checkpoint.npz`
//! (block5 and head parameters, and the optimizer's velocities under
//! `velocity/`) and `checkpoint.json` (config, progress, history), each
//! written atomically; the JSON, written last, is what makes it count.

use crate::config::TrainConfig;
use crate::error::{Error, IoContext, Result};
use crate::model::params::{NpzIn, NpzOut};
use crate::model::vgg::{block5_names, convs, BLOCK5_CONVS};
use crate::model::{Head, Norm};
use crate::report::history::{EpochRecord, StageResult};
use crate::train::recipe::{Best, State};
use ndarray::ArrayD;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::io::Write;
use std::path::Path;

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    format_version: u32,
    config: TrainConfig,
    stage: u8,
    epochs_done: usize,
    history: Vec<EpochRecord>,
    stage_results: Vec<StageResult>,
    has_block5_velocity: bool,
    /// What the run trains on (absent in checkpoints from before it was
    /// recorded).
    #[serde(default)]
    identity: Option<RunIdentity>,
    /// SHA-256 of checkpoint.npz: the JSON and the arrays belong together.
    #[serde(default)]
    npz_digest: Option<String>,
    /// The stage's best epoch so far and its validation accuracy
    /// (`--restore-best`; its weights are under `best/` in the npz).
    #[serde(default)]
    best: Option<(usize, f64)>,
}

/// The data and weights a run trains on: `--resume` refuses a checkpoint
/// made from others.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunIdentity {
    pub weights_digest: String,
    /// SHA-256 of each split's labels and images ([`crate::features::cache::dataset_digest`]).
    pub train_digest: String,
    pub test_digest: String,
}

const CHECKPOINT_VERSION: u32 = 1;
const VELOCITY: &str = "velocity/";
const BEST: &str = "best/";
const NORM_MEAN: &str = "norm/mean";
const NORM_INV_STD: &str = "norm/inv_std";

/// Writes checkpoint.npz, then checkpoint.json, into `dir`.
pub fn save_checkpoint(dir: &Path, cfg: &TrainConfig, identity: Option<&RunIdentity>, s: &State) -> Result<()> {
    let npz = dir.join("checkpoint.npz");
    crate::atomic_write(&npz, |f| {
        let mut w = NpzOut::new(f);
        w.convs(block5_names().map(String::from).zip(&s.block5))?;
        w.convs(block5_names().map(|n| format!("{VELOCITY}{n}")).zip(&s.v_block5))?;
        let as_array = |shape: &[usize], d: &[f32]| ArrayD::from_shape_vec(shape.to_vec(), d.to_vec()).expect("shape");
        for ((name, data, shape), (_, vdata, _)) in s.head.tensors().into_iter().zip(s.v_head.tensors()) {
            w.add(name, &as_array(&shape, data))?;
            w.add(format!("{VELOCITY}{name}"), &as_array(&shape, vdata))?;
        }
        if let Some(n) = &s.head.norm {
            w.add(NORM_MEAN, &n.mean)?;
            w.add(NORM_INV_STD, &n.inv_std)?;
        }
        if let Some(b) = &s.best {
            w.convs(block5_names().map(|n| format!("{BEST}{n}")).zip(&b.block5))?;
            for (name, data, shape) in b.head.tensors() {
                w.add(format!("{BEST}{name}"), &as_array(&shape, data))?;
            }
        }
        w.finish()
    })
    .at("cannot write", &npz)?;
    let meta = CheckpointMeta {
        format_version: CHECKPOINT_VERSION,
        config: cfg.clone(),
        stage: s.stage,
        epochs_done: s.epochs_done,
        history: s.history.clone(),
        stage_results: s.stage_results.clone(),
        has_block5_velocity: !s.v_block5.is_empty(),
        identity: identity.cloned(),
        npz_digest: Some(file_digest(&npz)?),
        best: s.best.as_ref().map(|b| (b.epoch, b.val_accuracy)),
    };
    let json = serde_json::to_vec_pretty(&meta).expect("plain data");
    let p = dir.join("checkpoint.json");
    crate::atomic_write(&p, |f| f.write_all(&json)).at("cannot write", &p)
}

/// The configuration a checkpoint in `dir` was made with, and what it
/// trains on.
pub fn checkpoint_config(dir: &Path) -> Result<(TrainConfig, Option<RunIdentity>)> {
    let m = read_meta(dir)?;
    Ok((m.config, m.identity))
}

fn file_digest(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).at("cannot read", p)?;
    Ok(crate::data::fetch::hex(&sha2::Sha256::digest(&bytes)))
}

fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let jp = dir.join("checkpoint.json");
    let text =
        std::fs::read_to_string(&jp).map_err(|e| Error::invalid(&jp, format!("no checkpoint to resume from ({e})")))?;
    let mut meta: CheckpointMeta =
        serde_json::from_str(&text).map_err(|e| Error::invalid(&jp, format!("not a checkpoint ({e})")))?;
    meta.config = meta.config.upgrade();
    if meta.format_version != CHECKPOINT_VERSION {
        return Err(Error::invalid(
            &jp,
            format!(
                "checkpoint format {} (this program reads {CHECKPOINT_VERSION})",
                meta.format_version
            ),
        ));
    }
    meta.config
        .check()
        .map_err(|e| Error::invalid(&jp, format!("config: {e}")))?;
    // Progress must add up: an edited epoch count or stage is refused.
    let (c, done) = (&meta.config, meta.epochs_done);
    let epochs = |stage| if stage == 1 { c.stage1.epochs } else { c.stage2.epochs };
    let expect_history = if meta.stage == 2 { c.stage1.epochs + done } else { done };
    let expect_results = meta.stage as usize - 1;
    let consistent = matches!(meta.stage, 1 | 2)
        && done <= epochs(meta.stage)
        && meta.history.len() == expect_history
        && (meta.stage_results.len() == expect_results || meta.stage_results.len() == expect_results + 1)
        && meta.has_block5_velocity == (meta.stage == 2);
    if !consistent {
        return Err(Error::invalid(
            &jp,
            format!(
                "inconsistent progress: stage {}, {} epochs done of {}, {} history rows, {} finished stages",
                meta.stage,
                done,
                epochs(if meta.stage == 2 { 2 } else { 1 }),
                meta.history.len(),
                meta.stage_results.len()
            ),
        ));
    }
    Ok(meta)
}

/// Reads a checkpoint written by [`save_checkpoint`]; returns the config
/// it was made with and the state.
pub fn load_checkpoint(dir: &Path) -> Result<(TrainConfig, State)> {
    let meta = read_meta(dir)?;
    let np = dir.join("checkpoint.npz");
    if let Some(want) = &meta.npz_digest {
        if file_digest(&np)? != *want {
            return Err(Error::invalid(
                &np,
                "does not belong to checkpoint.json (another run's, or changed since)",
            ));
        }
    }
    let mut npz = NpzIn::open(&np)?;
    let mut block5 = Vec::new();
    let mut v_block5 = Vec::new();
    for (_, name, cin, cout) in convs().skip(BLOCK5_CONVS.start) {
        block5.push(npz.conv(name, cin, cout)?);
        if meta.has_block5_velocity {
            v_block5.push(npz.conv(&format!("{VELOCITY}{name}"), cin, cout)?);
        }
    }
    let cfg = meta.config;
    let mut head = Head::new(&mut ChaCha8Rng::seed_from_u64(0), cfg.hidden, cfg.dropout, cfg.classes);
    if npz.has(NORM_MEAN) {
        let mut get = |k| -> Result<ndarray::Array1<f32>> {
            Ok(npz.array(k, &[512])?.into_dimensionality().expect("shape checked"))
        };
        let (mean, inv_std) = (get(NORM_MEAN)?, get(NORM_INV_STD)?);
        head.norm = Some(Norm { mean, inv_std });
    }
    let mut v_head = head.zeros_like();
    let mut best_head = meta.best.map(|_| head.clone());
    let shapes: Vec<(&'static str, Vec<usize>)> = head.tensors().into_iter().map(|(n, _, s)| (n, s)).collect();
    for ((name, shape), (w, v)) in shapes
        .iter()
        .zip(head.tensors_mut().into_iter().zip(v_head.tensors_mut()))
    {
        let a = npz.array(name, shape)?;
        let va = npz.array(&format!("{VELOCITY}{name}"), shape)?;
        w.copy_from_slice(a.as_slice().expect("fresh array"));
        v.copy_from_slice(va.as_slice().expect("fresh array"));
    }
    let best = match (meta.best, best_head.as_mut()) {
        (Some((epoch, val_accuracy)), Some(bh)) => {
            for ((name, shape), w) in shapes.iter().zip(bh.tensors_mut()) {
                let a = npz.array(&format!("{BEST}{name}"), shape)?;
                w.copy_from_slice(a.as_slice().expect("fresh array"));
            }
            let block5 = convs()
                .skip(BLOCK5_CONVS.start)
                .map(|(_, name, cin, cout)| npz.conv(&format!("{BEST}{name}"), cin, cout))
                .collect::<Result<_, _>>()?;
            Some(Best {
                epoch,
                val_accuracy,
                block5,
                head: bh.clone(),
            })
        }
        _ => None,
    };
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
        best,
    };
    Ok((cfg, state))
}
