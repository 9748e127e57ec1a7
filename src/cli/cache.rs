//! `vgg16 cache ls|rm`.

use super::DEFAULT_CACHE;
use anyhow::Result;
use clap::Subcommand;
use std::path::{Path, PathBuf};

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
}

pub fn run(what: CacheWhat) -> Result<()> {
    match what {
        CacheWhat::Ls { cache_dir } => cache_ls(&cache_dir),
        CacheWhat::Rm { cache_dir, all, names } => cache_rm(&cache_dir, all, &names),
    }
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
