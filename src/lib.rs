//! vgg16-cpu: VGG-16 transfer learning on plain multicore CPUs.
//!
//! The numeric core is an im2col + SGEMM convolution engine over NHWC `f32`
//! ndarrays ([`tensor`]), parallelised with rayon over fixed partitions so
//! results do not depend on the thread count.

pub mod bench;
pub mod cache;
pub mod data;
pub mod extract;
pub mod metrics;
pub mod model;
pub mod npy;
pub mod onnx_import;
pub mod optim;
pub mod progress;
pub mod report;
pub mod saved;
pub mod summary;
pub mod tensor;
pub mod train;
pub mod vgg;

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
