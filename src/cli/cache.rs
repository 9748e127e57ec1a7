//! `vgg16 cache ls|rm|build|merge`.

use super::progress::CliObserver;
use super::{load_weights, open_data, InputArgs, DEFAULT_CACHE};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use vgg16_cpu::data::Split;
use vgg16_cpu::features::cache::{self, CacheKey, Dtype, Shard, ShardOutcome};
use vgg16_cpu::model::vgg::auto_batch;

#[derive(Subcommand)]
pub enum CacheWhat {
    /// List caches: key, size, complete or not.
    Ls {
        /// Where activation caches live.
        #[arg(long, default_value = DEFAULT_CACHE)]
        cache_dir: PathBuf,
    },
    /// Remove caches by directory name (or id), or all of them.
    Rm {
        /// Where activation caches live.
        #[arg(long, default_value = DEFAULT_CACHE)]
        cache_dir: PathBuf,
        /// Remove every cache.
        #[arg(long)]
        all: bool,
        /// Cache directory names or ids (see `vgg16 cache ls`).
        names: Vec<String>,
    },
    /// Build the caches `vgg16 train` uses, whole or one shard of them
    /// (`--shard i/n`, e.g. a Slurm job array; under mpirun each rank
    /// builds its own shard). The last shard to finish seals the cache.
    Build(Box<BuildArgs>),
    /// Copy shards built on node-local disks into one --cache-dir and seal
    /// it: each SOURCE is a cache directory (`<cache-dir>/<split>-<S>px-...`)
    /// holding shards.
    Merge {
        /// The cache directory to merge into.
        #[arg(long, default_value = DEFAULT_CACHE)]
        cache_dir: PathBuf,
        /// Cache directories holding shards of one cache.
        #[arg(required = true)]
        sources: Vec<PathBuf>,
    },
}

#[derive(Args, Clone)]
pub struct BuildArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Which splits: train, test or all (train + test, + the mirrored
    /// training view with --flip true).
    #[arg(long, default_value = "all", value_parser = ["train", "test", "all"])]
    split: String,
    /// Also the horizontally mirrored training view (`train --flip true`,
    /// the tuned recipe), true or false.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    flip: bool,
    /// Only the first N training records (as `train --limit-train`).
    #[arg(long)]
    limit_train: Option<usize>,
    /// Only the first N test records (as `train --limit-test`).
    #[arg(long)]
    limit_test: Option<usize>,
    /// This process's shard, i/n with 0 <= i < n: chunk c (256 records) is
    /// built by shard c mod n. Default: the whole cache (under mpirun:
    /// rank/size).
    #[arg(long)]
    shard: Option<String>,
    /// Where activation caches live.
    #[arg(long, default_value = DEFAULT_CACHE)]
    cache_dir: PathBuf,
    /// Storage type of cached block4 activations: f32 or f16.
    #[arg(long, default_value = "f32")]
    cache_dtype: String,
    /// Images per batch of the pass (default as `train`).
    #[arg(long)]
    forward_batch_size: Option<usize>,
    /// Worker threads (default: every core; under mpirun, the cores shared
    /// among the node's ranks).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(what: CacheWhat) -> Result<()> {
    match what {
        CacheWhat::Ls { cache_dir } => cache_ls(&cache_dir),
        CacheWhat::Rm { cache_dir, all, names } => cache_rm(&cache_dir, all, &names),
        CacheWhat::Build(args) => {
            let comm = super::collective()?;
            let threads = super::rank_threads(args.threads, comm.size());
            let r = super::with_threads(threads, || cache_build(&args, &*comm));
            super::end_rank(r, &*comm)
        }
        CacheWhat::Merge { cache_dir, sources } => {
            let (key, out) = cache::merge(&cache_dir, &sources, &mut CliObserver::default())?;
            match out {
                ShardOutcome::Complete => println!("{}: complete", cache_dir.join(key.dir_name()).display()),
                ShardOutcome::Waiting { missing } => println!(
                    "{}: {missing} chunks still missing; merge the other shards' directories too",
                    cache_dir.join(key.dir_name()).display()
                ),
            }
            Ok(())
        }
    }
}

fn cache_build(args: &BuildArgs, comm: &dyn vgg16_cpu::train::parallel::Collective) -> Result<()> {
    let dtype = Dtype::parse(&args.cache_dtype)
        .with_context(|| format!("--cache-dtype '{}': expected f32 or f16", args.cache_dtype))?;
    super::check_image_size(args.input.image_size)?;
    let shard = match (&args.shard, comm.size()) {
        (Some(_), n) if n > 1 => {
            bail!("--shard: under mpirun each rank builds shard rank/size by itself; drop --shard")
        }
        (Some(s), _) => Shard::parse(s)?,
        (None, n) => Shard {
            index: comm.rank(),
            count: n,
        },
    };
    let source = open_data(&args.input.source)?;
    let model = load_weights(&args.input.weights)?;
    let size = args.input.image_size;
    let batch = args.forward_batch_size.unwrap_or(auto_batch(size)).max(1);
    let mut jobs = Vec::new();
    if args.split != "test" {
        let ds = source.load(Split::Train)?;
        let n = args.limit_train.unwrap_or(ds.len()).min(ds.len());
        if args.flip {
            jobs.push((ds.flipped(), n));
        }
        jobs.insert(0, (ds, n));
    }
    if args.split != "train" {
        let ds = source.load(Split::Test)?;
        let n = args.limit_test.unwrap_or(ds.len()).min(ds.len());
        jobs.push((ds, n));
    }
    let mut obs: Box<dyn vgg16_cpu::Observer> = if comm.rank() == 0 {
        Box::new(CliObserver::default())
    } else {
        Box::new(vgg16_cpu::Silent)
    };
    for (ds, n) in &jobs {
        let key = CacheKey::new(&model.digest(), size, ds, *n, dtype);
        let dir = args.cache_dir.join(key.dir_name());
        if shard.count == 1 {
            cache::open_or_build(&args.cache_dir, &key, &model, ds, batch, &mut *obs)?;
            println!("{}: complete", dir.display());
            continue;
        }
        let out = cache::build_shard(&args.cache_dir, &key, &model, ds, batch, shard, &mut *obs)?;
        comm.barrier()?;
        let out = if comm.size() > 1 {
            cache::seal(&args.cache_dir, &key, &mut *obs)?
        } else {
            out
        };
        if comm.rank() == 0 {
            match out {
                ShardOutcome::Complete => println!("{}: complete", dir.display()),
                ShardOutcome::Waiting { missing } => println!(
                    "{}: shard {shard} done; {missing} chunks of other shards still to build",
                    dir.display()
                ),
            }
        }
    }
    Ok(())
}

fn cache_ls(dir: &Path) -> Result<()> {
    let all = vgg16_cpu::features::cache::list(dir)?;
    if all.is_empty() {
        println!("no caches in {}", dir.display());
    }
    for (p, meta, bytes) in all {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match meta {
            Some(m) => println!(
                "{name}  {}  {}px  {} records  {:?}  {:.2} GB  {}  weights {}  data {}",
                m.key.split,
                m.key.image_size,
                m.key.records,
                m.key.dtype,
                bytes as f64 / 1e9,
                if m.complete {
                    "complete".to_string()
                } else {
                    format!("incomplete ({}/{})", m.done, m.key.records)
                },
                &m.key.weights_digest[..12],
                &m.key.dataset_digest[..12]
            ),
            None => println!("{name}  (no readable meta.json)  {:.2} GB", bytes as f64 / 1e9),
        }
    }
    Ok(())
}

fn cache_rm(dir: &Path, all: bool, names: &[String]) -> Result<()> {
    let done = vgg16_cpu::features::cache::remove(dir, all, names)?;
    for (name, bytes) in done.removed {
        println!("removed {name} ({:.2} GB)", bytes as f64 / 1e9);
    }
    for name in done.skipped {
        println!("left {name}: not a vgg16 cache (no valid meta.json naming it)");
    }
    Ok(())
}
