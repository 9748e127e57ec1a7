//! `vgg16 evaluate`: a saved model on a split, as text or JSON.

use super::progress::CliObserver;
use super::{open_data_with, DataArgs, DEFAULT_CACHE};
use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use vgg16_cpu::data::cifar::LabelMode;
use vgg16_cpu::data::{DataOptions, DatasetKind, Resize, Split};
use vgg16_cpu::model::saved::{resolve, SavedModel};
use vgg16_cpu::model::vgg::auto_batch;
use vgg16_cpu::EvaluateJob;

#[derive(Args)]
pub struct EvaluateArgs {
    /// A model.npz, or a run directory (meaning its model.npz).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    source: DataArgs,
    /// train or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Evaluate the first N records of the split.
    #[arg(long)]
    limit: Option<usize>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// Write confusion_matrix.png into DIR.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Where to look for a matching activation cache.
    #[arg(long, default_value = DEFAULT_CACHE)]
    cache_dir: PathBuf,
    /// Images per forward batch (default: 64 up to 64 px, 16 at 224).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn evaluate(args: &EvaluateArgs) -> Result<()> {
    let model = SavedModel::load(&args.model)?;
    let split =
        Split::parse(&args.split).with_context(|| format!("--split '{}': expected train or test", args.split))?;
    let size = model.meta.image_size;
    // A folder is read exactly as the model was trained (its resize policy).
    let mut opts = args.source.options();
    opts.folder.resize = model.meta.resize();
    // A CIFAR-100 model (100 fine or 20 coarse classes) with --dataset
    // auto reads CIFAR-100 where there is one.
    let classes = model.meta.class_names.len();
    if opts.kind == DatasetKind::Auto && model.meta.resize() == Resize::Cifar32 && (classes == 100 || classes == 20) {
        let c100 = DataOptions {
            kind: DatasetKind::Cifar100,
            label_mode: if classes == 100 {
                LabelMode::Fine
            } else {
                LabelMode::Coarse
            },
            ..opts.clone()
        };
        if vgg16_cpu::data::locate(&args.source.data, &c100).is_ok() {
            opts = c100;
        }
    }
    let source = open_data_with(&args.source, opts)?;
    let data = source.load(split)?;
    let job = EvaluateJob {
        model: &model,
        data: &data,
        records: args.limit.unwrap_or(data.len()),
        batch_size: args.batch_size.unwrap_or(auto_batch(size)),
        cache_dir: Some(args.cache_dir.clone()),
    };
    let done = job.run(&mut CliObserver::default())?;
    let (rep, secs) = (&done.report, done.seconds);
    let n = rep.samples;
    let how = match &done.cache {
        Some(dir) => format!("cache hit ({}): block5 and head only", dir.display()),
        None => "no matching cache: full network".to_string(),
    };
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let title = format!(
            "confusion matrix: {} images of {}, accuracy {:.2}%",
            n,
            split.name(),
            100.0 * rep.accuracy
        );
        vgg16_cpu::report::plots::plot_confusion(
            &rep.confusion_matrix,
            &model.meta.class_names,
            &title,
            &dir.join("confusion_matrix.png"),
        )?;
    }
    if args.json {
        let mut v = serde_json::to_value(rep)?;
        v["split"] = json!(split.name());
        v["model"] = json!(resolve(&args.model));
        v["seconds"] = json!(secs);
        v["images_per_second"] = json!(n as f64 / secs);
        println!("{v}");
    } else {
        println!(
            "{} on {} {} records ({how}; {:.1} s, {:.0} img/s)\n",
            resolve(&args.model).display(),
            n,
            split.name(),
            secs,
            n as f64 / secs
        );
        print!("{}", rep.text());
    }
    eprintln!(
        "evaluate: {n} images in {secs:.1} s ({:.0} img/s), {how}",
        n as f64 / secs
    );
    Ok(())
}
