//! `vgg16 train`: flags -> [`TrainConfig`] -> [`TrainJob`], and the
//! closing report.

use super::progress::CliObserver;
use super::{load_weights, open_data, InputArgs, DEFAULT_CACHE};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use vgg16_cpu::config::Schedule;
use vgg16_cpu::features::cache::Dtype;
use vgg16_cpu::train::parallel::Collective;
use vgg16_cpu::{TrainConfig, TrainJob};

#[derive(Args, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    input: InputArgs,
    /// The recipe the hyper-parameters below start from: seed (Keras's,
    /// exactly) or tuned (BENCHMARKS.md section 8). Any flag below
    /// overrides its part.
    #[arg(long, default_value = "seed", value_parser = ["seed", "tuned"])]
    recipe: String,
    /// Stage 1 (head only): SGD learning rate (seed: 0.01).
    #[arg(long)]
    stage1_lr: Option<f64>,
    /// Stage 1: SGD momentum, in [0, 1) (seed: 0).
    #[arg(long)]
    stage1_momentum: Option<f64>,
    /// Stage 1: images per SGD step (seed: 32).
    #[arg(long)]
    stage1_batch_size: Option<usize>,
    /// Stage 1: epochs over the training records (seed: 2).
    #[arg(long)]
    stage1_epochs: Option<usize>,
    /// Stage 1: L2 weight decay on kernels (seed: 0).
    #[arg(long)]
    stage1_weight_decay: Option<f64>,
    /// Stage 1: learning-rate schedule, constant or cosine (seed: constant).
    #[arg(long)]
    stage1_schedule: Option<String>,
    /// Stage 1: epochs of linear learning-rate warm-up (seed: 0).
    #[arg(long)]
    stage1_warmup_epochs: Option<usize>,
    /// Stage 1: label smoothing of the loss's targets, in [0, 1) (default
    /// 0); overrides --label-smoothing for this stage.
    #[arg(long)]
    stage1_label_smoothing: Option<f64>,
    /// Stage 2 (block5 + head): SGD learning rate (seed: 1e-4).
    #[arg(long)]
    stage2_lr: Option<f64>,
    /// Stage 2: SGD momentum, in [0, 1) (seed: 0.9).
    #[arg(long)]
    stage2_momentum: Option<f64>,
    /// Stage 2: images per SGD step (seed: 64).
    #[arg(long)]
    stage2_batch_size: Option<usize>,
    /// Stage 2: epochs over the training records (seed: 5).
    #[arg(long)]
    stage2_epochs: Option<usize>,
    /// Stage 2: L2 weight decay on kernels (seed: 0).
    #[arg(long)]
    stage2_weight_decay: Option<f64>,
    /// Stage 2: learning-rate schedule, constant or cosine (seed: constant).
    #[arg(long)]
    stage2_schedule: Option<String>,
    /// Stage 2: epochs of linear learning-rate warm-up (seed: 0).
    #[arg(long)]
    stage2_warmup_epochs: Option<usize>,
    /// Stage 2: label smoothing of the loss's targets, in [0, 1) (default
    /// 0); overrides --label-smoothing for this stage.
    #[arg(long)]
    stage2_label_smoothing: Option<f64>,
    /// Standardize the head's GAP features with the training features'
    /// mean and std, true or false (seed: false; folded into the saved head).
    #[arg(long)]
    standardize: Option<bool>,
    /// Label smoothing of the loss's targets in both stages, in [0, 1)
    /// (default 0 in both recipes); --stageN-label-smoothing sets one stage's.
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Train on horizontally flipped images too, true or false (seed:
    /// false, tuned: true): a second cache view of the training split
    /// (twice the cache), each record's view drawn per epoch.
    #[arg(long)]
    flip: Option<bool>,
    /// End each stage at its best epoch by validation accuracy (needs
    /// --validation-split; never chosen on the test set).
    #[arg(long)]
    restore_best: bool,
    /// Validate on the last fraction F of the training records instead of
    /// the test split (Keras's validation_split).
    #[arg(long)]
    validation_split: Option<f64>,
    /// Seed of the head's initialisation, the shuffling and dropout.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Add Dense(N, ReLU) between GAP and the classifier.
    #[arg(long)]
    hidden: Option<usize>,
    /// Dropout rate before the classifier (training only).
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Use only the first N training records (file order).
    #[arg(long)]
    limit_train: Option<usize>,
    /// Use only the first N test records (file order).
    #[arg(long)]
    limit_test: Option<usize>,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where activation caches live.
    #[arg(long, default_value = DEFAULT_CACHE)]
    cache_dir: PathBuf,
    /// Storage type of cached block4 activations: f32 or f16.
    #[arg(long, default_value = "f32")]
    cache_dtype: String,
    /// Recompute blocks 1-4 for every batch, as Keras does (for proofs and
    /// measurements; much slower).
    #[arg(long)]
    no_cache: bool,
    /// Run directory (default: a new runs/<timestamp>/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the run already in --out (otherwise refused).
    #[arg(long)]
    overwrite: bool,
    /// Continue the run in DIR from its last completed epoch.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Images per batch of the cache pass (default: 64 up to 64 px, fewer
    /// above, so activations stay a few hundred MB: 16 at 224).
    #[arg(long)]
    forward_batch_size: Option<usize>,
    /// Compute each batch's gradients in K parts, one after another, and
    /// step once (under mpirun: K parts per rank). Same step as K = 1 up
    /// to float rounding; bit-identical to N ranks with K = 1 when K = N.
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
}

impl TrainArgs {
    /// The recipe these flags describe.
    fn config(&self, classes: usize) -> Result<TrainConfig> {
        let size = self.input.image_size;
        let mut c = match self.recipe.as_str() {
            "tuned" => TrainConfig::tuned(size, classes),
            _ => TrainConfig::recipe(size, classes),
        };
        let stages = [
            (
                &mut c.stage1,
                (
                    self.stage1_lr,
                    self.stage1_momentum,
                    self.stage1_batch_size,
                    self.stage1_epochs,
                ),
                (
                    self.stage1_weight_decay,
                    &self.stage1_schedule,
                    self.stage1_warmup_epochs,
                    self.stage1_label_smoothing,
                    1,
                ),
            ),
            (
                &mut c.stage2,
                (
                    self.stage2_lr,
                    self.stage2_momentum,
                    self.stage2_batch_size,
                    self.stage2_epochs,
                ),
                (
                    self.stage2_weight_decay,
                    &self.stage2_schedule,
                    self.stage2_warmup_epochs,
                    self.stage2_label_smoothing,
                    2,
                ),
            ),
        ];
        for (sc, (lr, m, b, e), (wd, sched, warm, ls, n)) in stages {
            sc.lr = lr.unwrap_or(sc.lr);
            sc.momentum = m.unwrap_or(sc.momentum);
            sc.batch_size = b.unwrap_or(sc.batch_size);
            sc.epochs = e.unwrap_or(sc.epochs);
            sc.weight_decay = wd.unwrap_or(sc.weight_decay);
            sc.warmup_epochs = warm.unwrap_or(sc.warmup_epochs);
            sc.label_smoothing = ls.or(self.label_smoothing).unwrap_or(sc.label_smoothing);
            if let Some(name) = sched {
                sc.schedule = Schedule::parse(name)
                    .with_context(|| format!("--stage{n}-schedule '{name}': expected constant or cosine"))?;
            }
        }
        c.hidden = self.hidden;
        c.dropout = self.dropout;
        c.seed = self.seed;
        c.limit_train = self.limit_train;
        c.limit_test = self.limit_test;
        c.validation_split = self.validation_split;
        c.standardize = self.standardize.unwrap_or(c.standardize);
        c.flip = self.flip.unwrap_or(c.flip);
        c.restore_best = self.restore_best;
        c.accumulate = self.accumulate;
        Ok(c)
    }
}

/// `vgg16 train` as one of `comm`'s ranks (one process: [`Solo`]).
pub fn train(args: &TrainArgs, comm: Box<dyn Collective>) -> Result<()> {
    if comm.size() > 1 && args.out.is_none() && args.resume.is_none() {
        return super::end_rank(
            Err(anyhow::anyhow!(
                "under mpirun give the run directory with --out DIR (on a filesystem every rank sees): each rank would otherwise name its own"
            )),
            &*comm,
        );
    }
    let rank = comm.rank();
    let size = comm.size();
    let r = train_rank(args, comm);
    if let (Err(e), true) = (&r, size > 1) {
        eprintln!("error on rank {rank}: {e:#}");
        std::process::exit(1);
    }
    r
}

fn train_rank(args: &TrainArgs, comm: Box<dyn Collective>) -> Result<()> {
    let cache_dtype = Dtype::parse(&args.cache_dtype)
        .with_context(|| format!("--cache-dtype '{}': expected f32 or f16", args.cache_dtype))?;
    let mut job = match &args.resume {
        Some(dir) => {
            let source = open_data(&args.input.source)?;
            TrainJob::resume(dir, source, load_weights(&args.input.weights)?)?
        }
        None => {
            // Every flag is checked before any data is read (the class count,
            // the dataset's, is filled in after).
            args.config(2)?.check()?;
            let source = open_data(&args.input.source)?;
            let config = args.config(source.num_classes())?;
            config.check()?;
            let out = args.out.clone().unwrap_or_else(|| {
                PathBuf::from("runs").join(chrono::Local::now().format("%Y%m%d-%H%M%S").to_string())
            });
            TrainJob::new(config, source, load_weights(&args.input.weights)?, out)
        }
    };
    job.cache_dir = args.cache_dir.clone();
    job.cache_dtype = cache_dtype;
    job.use_cache = !args.no_cache;
    job.forward_batch = args.forward_batch_size;
    job.overwrite = args.overwrite;
    let writer = comm.rank() == 0;
    job.comm = comm;
    if !writer {
        // Rank 0 reports and writes; the others compute quietly.
        job.run(&mut vgg16_cpu::Silent)?;
        return Ok(());
    }
    let done = job.run(&mut CliObserver::default())?;
    if let Some(rep) = &done.test_report {
        eprintln!("\n{}", rep.text());
    }
    eprintln!("{}", done.comparison);
    let written: Vec<&str> = vgg16_cpu::train::job::RUN_FILES
        .iter()
        .copied()
        .filter(|f| done.out.join(f).is_file())
        .collect();
    eprintln!("run directory {}: {}", done.out.display(), written.join(", "));
    Ok(())
}
