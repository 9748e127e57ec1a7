//! The saved-model format: one self-contained `.npz`.
//!
//! Members (all `.npy`):
//! - `blockB_convC/kernel` (3, 3, Cin, Cout) and `/bias` for the 13 conv
//!   layers: the whole base as the model runs it (block5 as trained);
//! - `classification/kernel` (I, classes), `classification/bias`, and, with
//!   a hidden layer, `dense/kernel` (512, H), `dense/bias`;
//! - `meta`: uint8, the UTF-8 JSON of [`ModelMeta`] (format name and
//!   version, image size, preprocessing, class names, the digest of the
//!   ImageNet base it started from, the training history and config).
//!
//! A file of another format version, or missing or mis-shaped arrays, is
//! refused with a message naming the file and the problem.

use crate::model::{Dense, Head};
use crate::train::{EpochRecord, TrainConfig};
use crate::vgg::{ConvParams, Vgg16};
use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array2};
use ndarray_npy::{NpzReader, NpzWriter};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "vgg16-cpu-model";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelMeta {
    pub format: String,
    pub format_version: u32,
    /// 1: head trained on the frozen base; 2: block5 fine-tuned too.
    pub stage: u8,
    pub image_size: usize,
    pub preprocessing: String,
    pub class_names: Vec<String>,
    /// Content digest of the base weights training started from (the key of
    /// the activation caches this model can reuse: blocks 1-4 are those).
    pub base_weights_digest: String,
    pub hidden: Option<usize>,
    pub history: Vec<EpochRecord>,
    pub config: Option<TrainConfig>,
}

pub struct SavedModel {
    pub base: Vgg16,
    pub head: Head,
    pub meta: ModelMeta,
}

/// `--model` takes a file or a run directory (meaning its model.npz).
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("model.npz")
    } else {
        path.to_path_buf()
    }
}

impl SavedModel {
    /// The base with block5 replaced by `block5`.
    pub fn new(base: &Vgg16, block5: &[ConvParams], head: &Head, meta: ModelMeta) -> SavedModel {
        let mut b = base.clone();
        b.convs[10..13].clone_from_slice(block5);
        SavedModel {
            base: b,
            head: head.clone(),
            meta,
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.meta)?;
        crate::atomic_write(path, |f| {
            let mut npz = NpzWriter::new(std::io::BufWriter::new(f));
            let io = std::io::Error::other;
            for ((_, name, _, _), p) in crate::vgg::convs().zip(&self.base.convs) {
                npz.add_array(format!("{name}/kernel"), &p.w).map_err(io)?;
                npz.add_array(format!("{name}/bias"), &p.b).map_err(io)?;
            }
            if let Some(h) = &self.head.hidden {
                npz.add_array("dense/kernel", &h.w).map_err(io)?;
                npz.add_array("dense/bias", &h.b).map_err(io)?;
            }
            npz.add_array("classification/kernel", &self.head.out.w).map_err(io)?;
            npz.add_array("classification/bias", &self.head.out.b).map_err(io)?;
            npz.add_array("meta", &Array1::from(json.clone())).map_err(io)?;
            let mut inner = npz.finish().map_err(io)?;
            inner.flush()
        })
        .with_context(|| format!("cannot write model {}", path.display()))
    }

    pub fn load(path: &Path) -> Result<SavedModel> {
        let path = resolve(path);
        if !path.is_file() {
            bail!(
                "{}: no such model file (a model.npz written by `vgg16 train`, or its run directory)",
                path.display()
            );
        }
        let f = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut npz = NpzReader::new(f).with_context(|| format!("{}: not a valid .npz", path.display()))?;
        let names = npz.names().with_context(|| format!("cannot read {}", path.display()))?;
        if !names.iter().any(|n| n == "meta") {
            bail!(
                "{}: not a vgg16-cpu model (no 'meta' array; base weights alone are not a model)",
                path.display()
            );
        }
        let raw: Array1<u8> = npz
            .by_name("meta")
            .with_context(|| format!("{}: unreadable 'meta'", path.display()))?;
        let meta: ModelMeta = serde_json::from_slice(raw.as_slice().unwrap_or_default())
            .with_context(|| format!("{}: 'meta' is not valid model metadata", path.display()))?;
        if meta.format != FORMAT || meta.format_version != FORMAT_VERSION {
            bail!(
                "{}: model format {} version {}, this program reads {FORMAT} version {FORMAT_VERSION}",
                path.display(),
                meta.format,
                meta.format_version
            );
        }
        let classes = meta.class_names.len();
        let mut dense = |name: &str, rows: usize, cols: Option<usize>| -> Result<Dense> {
            let w: Array2<f32> = npz
                .by_name(&format!("{name}/kernel"))
                .with_context(|| format!("{}: missing or bad '{name}/kernel'", path.display()))?;
            let b: Array1<f32> = npz
                .by_name(&format!("{name}/bias"))
                .with_context(|| format!("{}: missing or bad '{name}/bias'", path.display()))?;
            if w.nrows() != rows || cols.is_some_and(|c| w.ncols() != c) || b.len() != w.ncols() {
                bail!(
                    "{}: '{name}' has kernel {:?} and bias {:?}, expected ({rows}, {:?})",
                    path.display(),
                    w.dim(),
                    b.len(),
                    cols
                );
            }
            if w.iter().chain(b.iter()).any(|v| !v.is_finite()) {
                bail!("{}: '{name}' holds NaN or infinite values", path.display());
            }
            Ok(Dense { w, b })
        };
        let hidden = match meta.hidden {
            Some(h) => Some(dense("dense", 512, Some(h))?),
            None => None,
        };
        let out = dense("classification", meta.hidden.unwrap_or(512), Some(classes))?;
        drop(npz);
        let base = Vgg16::load_npz(&path)?;
        let dropout = meta.config.as_ref().map_or(0.0, |c| c.dropout);
        Ok(SavedModel {
            base,
            head: Head { hidden, out, dropout },
            meta,
        })
    }

    pub fn block5(&self) -> &[ConvParams] {
        &self.base.convs[10..13]
    }
}
