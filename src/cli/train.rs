//! `vgg16 train`: flags -> [`TrainConfig`] -> [`TrainJob`], and the
//! closing report.

use super::progress::CliObserver;
use super::{load_weights, open_data, InputArgs, DEFAULT_CACHE};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use vgg16_cpu::data::cifar;
use vgg16_cpu::features::cache::Dtype;
use vgg16_cpu::{StageConfig, TrainConfig, TrainJob};

#[derive(Args, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Stage 1 (head only): SGD learning rate.
    #[arg(long, default_value_t = 0.01)]
    stage1_lr: f64,
    /// Stage 1: images per SGD step.
    #[arg(long, default_value_t = 32)]
    stage1_batch_size: usize,
    /// Stage 1: epochs over the training records.
    #[arg(long, default_value_t = 2)]
    stage1_epochs: usize,
    /// Stage 2 (block5 + head): SGD learning rate.
    #[arg(long, default_value_t = 1e-4)]
    stage2_lr: f64,
    /// Stage 2: SGD momentum, in [0, 1).
    #[arg(long, default_value_t = 0.9)]
    stage2_momentum: f64,
    /// Stage 2: images per SGD step.
    #[arg(long, default_value_t = 64)]
    stage2_batch_size: usize,
    /// Stage 2: epochs over the training records.
    #[arg(long, default_value_t = 5)]
    stage2_epochs: usize,
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
}

impl TrainArgs {
    /// The recipe these flags describe.
    fn config(&self) -> TrainConfig {
        TrainConfig {
            image_size: self.input.image_size,
            stage1: StageConfig {
                lr: self.stage1_lr,
                momentum: 0.0,
                batch_size: self.stage1_batch_size,
                epochs: self.stage1_epochs,
            },
            stage2: StageConfig {
                lr: self.stage2_lr,
                momentum: self.stage2_momentum,
                batch_size: self.stage2_batch_size,
                epochs: self.stage2_epochs,
            },
            hidden: self.hidden,
            dropout: self.dropout,
            seed: self.seed,
            classes: cifar::NUM_CLASSES,
            limit_train: self.limit_train,
            limit_test: self.limit_test,
            validation_split: self.validation_split,
        }
    }
}

pub fn train(args: &TrainArgs) -> Result<()> {
    let cache_dtype = Dtype::parse(&args.cache_dtype)
        .with_context(|| format!("--cache-dtype '{}': expected f32 or f16", args.cache_dtype))?;
    let mut job = match &args.resume {
        Some(dir) => {
            let source = open_data(&args.input.data)?;
            TrainJob::resume(dir, source, load_weights(&args.input.weights)?)?
        }
        None => {
            let config = args.config();
            config.check()?;
            let source = open_data(&args.input.data)?;
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
