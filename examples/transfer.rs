//! The transfer-learning recipe from Rust, on the bundled CIFAR-10 sample
//! (500 training / 100 test records) at 32x32:
//!
//! ```text
//! cargo run --release --example transfer [-- WEIGHTS.npz [RUN_DIR]]
//! ```
//!
//! WEIGHTS defaults to weights/vgg16_imagenet_notop.npz (`vgg16 weights
//! fetch` makes it); RUN_DIR to a new temporary directory. `cargo test`
//! builds this file, so it keeps up with the library.

use std::path::PathBuf;
use vgg16_cpu::data::cifar;
use vgg16_cpu::model::vgg::Vgg16;
use vgg16_cpu::report::history::{EpochRecord, StageResult};
use vgg16_cpu::{Observer, TrainConfig, TrainJob};

/// Prints a line per epoch and per stage; ignores progress within one.
struct Log;

impl Observer for Log {
    fn info(&mut self, line: &str) {
        println!("{line}");
    }
    fn epoch(&mut self, r: &EpochRecord, epochs: usize) {
        println!(
            "stage {} epoch {}/{epochs}: loss {:.4}, accuracy {:.4}, val_accuracy {:.4}",
            r.stage, r.epoch, r.train_loss, r.train_accuracy, r.val_accuracy
        );
    }
    fn stage_done(&mut self, r: &StageResult) {
        println!("stage {} test accuracy {:.4}", r.stage, r.test_accuracy);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let weights = PathBuf::from(args.next().unwrap_or("weights/vgg16_imagenet_notop.npz".into()));
    let tmp = tempfile::tempdir()?;
    let out = args.next().map(PathBuf::from).unwrap_or(tmp.path().join("run"));

    // The data and the ImageNet base.
    let sample = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sample");
    let data = cifar::locate(&sample)?;
    let base = Vgg16::load_npz(&weights)?;

    // Keras's recipe (stage 1: head, SGD 0.01, batch 32, 2 epochs; stage 2:
    // block5 + head, SGD 1e-4 momentum 0.9, batch 64, 5 epochs) at 32 px.
    let config = TrainConfig::recipe(32, cifar::NUM_CLASSES);
    let mut job = TrainJob::new(config, data, base, out.clone());
    job.cache_dir = tmp.path().join("cache");
    let done = job.run(&mut Log)?;

    for r in &done.stage_results {
        println!(
            "stage {}: test accuracy {:.4}, test loss {:.4}",
            r.stage, r.test_accuracy, r.test_loss
        );
    }
    println!("model, history, plots and reports in {}", done.out.display());
    Ok(())
}
