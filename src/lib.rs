//! vgg16-cpu: VGG-16 transfer learning on plain multicore CPUs.
//!
//! The job, as data flowing through, one module a step:
//!
//! | step | where |
//! | --- | --- |
//! | bytes: CIFAR-10 records | [`data::cifar`] |
//! | preprocess (BGR, minus means) and resize | [`data::image`] |
//! | blocks 1-4 (frozen), batched | [`model::vgg`], [`features::BatchedForward`] |
//! | activation cache | [`features::cache`] |
//! | block5 | [`model::block5`] |
//! | head (GAP -> Dense) | [`model::head`] |
//! | loss | [`tensor::ops`] (softmax cross-entropy) |
//! | SGD | [`train::optim`], the epoch loop in [`train::recipe`] |
//! | report | [`report`] |
//!
//! [`TrainJob`] runs all of it (what `vgg16 train` calls); [`EvaluateJob`]
//! and [`PredictJob`] use a saved model; [`features::extract::extract`]
//! writes activations. Jobs never print: they report to an [`Observer`].
//! The numeric core is [`tensor`]: convolution behind one dispatch
//! (Winograd, direct kernels per ISA, im2col + SGEMM, tap classes),
//! parallelised with rayon over fixed partitions so results do not depend
//! on the thread count.

pub mod bench;
pub mod config;
pub mod data;
pub mod error;
pub mod features;
pub mod infer;
pub mod model;
pub mod npy;
pub mod observer;
pub mod report;
pub mod tensor;
pub mod train;

pub use config::{StageConfig, TrainConfig};
pub use error::{Error, Result};
pub use infer::{EvaluateJob, PredictJob};
pub use observer::{Observer, Silent};
pub use train::{TrainJob, TrainOutcome};

use std::path::Path;

/// Writes a file completely under a temporary name in the same directory,
/// syncs it, then renames it to `path`: an interrupted run never leaves a
/// half-written file that looks whole.
pub fn atomic_write(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    write(tmp.as_file_mut())?;
    // Temporary files are created 0600; the result is an ordinary file.
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
