//! `vgg16 extract`: activations of chosen layers into one .npz.

use super::progress::CliObserver;
use super::{check_image_size, load_weights, open_data, InputArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use vgg16_cpu::data::Split;
use vgg16_cpu::model::vgg::auto_batch;

#[derive(Args)]
pub struct ExtractArgs {
    #[command(flatten)]
    input: InputArgs,
    /// train or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// How many records (default: to the end of the split).
    #[arg(long)]
    limit: Option<usize>,
    /// First record, in file order.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Comma-separated layer names (block1_conv1 .. block5_pool) or gap.
    #[arg(long, default_value = "gap")]
    layers: String,
    /// The .npz to write.
    #[arg(long)]
    out: PathBuf,
    /// Images per forward batch (default: 64 up to 64 px, 16 at 224).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn extract(args: &ExtractArgs) -> Result<()> {
    check_image_size(args.input.image_size)?;
    let split =
        Split::parse(&args.split).with_context(|| format!("--split '{}': expected train or test", args.split))?;
    let layers = vgg16_cpu::features::extract::parse_layers(&args.layers)?;
    let batch_size = args.batch_size.unwrap_or(auto_batch(args.input.image_size));
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let source = open_data(&args.input.source)?;
    let model = load_weights(&args.input.weights)?;
    let data = source.load(split)?;
    if args.offset > data.len() {
        bail!(
            "--offset {} is past the end of the {} split ({} records)",
            args.offset,
            split.name(),
            data.len()
        );
    }
    let count = args
        .limit
        .unwrap_or(data.len() - args.offset)
        .min(data.len() - args.offset);
    eprintln!(
        "extracting {} of {count} {} records from {} at {}x{} into {}",
        layers.join(","),
        split.name(),
        source.path().display(),
        args.input.image_size,
        args.input.image_size,
        args.out.display()
    );
    let range = vgg16_cpu::features::extract::Range {
        offset: args.offset,
        count,
        size: args.input.image_size,
        batch: batch_size,
    };
    let timing =
        vgg16_cpu::features::extract::extract(&model, &data, range, &layers, &args.out, &mut CliObserver::default())?;
    let secs = timing.secs;
    let gflop = 30.7 * (args.input.image_size as f64 / 224.0).powi(2) * count as f64;
    // The rate after the first batch is the one to set beside a benchmark
    // that leaves out its warm-up runs (ONNX Runtime's peer script does).
    let steady = match timing.steady_rate() {
        Some(r) => format!("; {r:.1} img/s after the first batch"),
        None => String::new(),
    };
    eprintln!(
        "done: {count} images in {secs:.1} s ({:.1} img/s, {:.0} GFLOP/s nominal{steady}) -> {}",
        count as f64 / secs,
        gflop / secs,
        args.out.display()
    );
    Ok(())
}
