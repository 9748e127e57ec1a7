//! `vgg16 predict`: top-k classes of image files.

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use vgg16_cpu::model::saved::SavedModel;
use vgg16_cpu::PredictJob;

#[derive(Args)]
pub struct PredictArgs {
    /// A model.npz, or a run directory (meaning its model.npz).
    #[arg(long)]
    model: PathBuf,
    /// Image files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// One JSON object per image, one a line.
    #[arg(long)]
    json: bool,
    /// Images per forward batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn predict(args: &PredictArgs) -> Result<()> {
    let model = SavedModel::load(&args.model)?;
    let job = PredictJob {
        model: &model,
        images: &args.images,
        top_k: args.top_k,
        batch_size: args.batch_size.max(1),
    };
    let failed = job.run(|path, answer| match answer {
        Err(e) => eprintln!("error: {}", vgg16_cpu::error::chain(&e)),
        Ok(top) if args.json => {
            let t: Vec<_> = top.iter().map(|(n, q)| json!({"class": n, "probability": q})).collect();
            println!("{}", json!({"file": path, "top": t}));
        }
        Ok(top) => {
            let t: Vec<String> = top.iter().map(|(n, q)| format!("{n} {:.1}%", 100.0 * q)).collect();
            println!("{}: {}", path.display(), t.join(", "));
        }
    });
    if failed > 0 {
        bail!("{failed} of {} images could not be read", args.images.len());
    }
    Ok(())
}
