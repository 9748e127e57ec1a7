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

use crate::config::TrainConfig;
use crate::error::{Error, IoContext, Result};
use crate::model::params::{NpzIn, NpzOut};
use crate::model::vgg::{convs, ConvParams, Vgg16};
use crate::model::{Dense, Head};
use crate::report::history::EpochRecord;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};
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
    /// How images reach `image_size` ([`crate::data::Resize`] name):
    /// "cifar32" (CIFAR models, and every model saved before this field),
    /// "stretch" or "center-crop" (folder models). `predict` and
    /// `evaluate` apply exactly this.
    #[serde(default = "cifar32")]
    pub resize: String,
    pub class_names: Vec<String>,
    /// Content digest of the base weights training started from (the key of
    /// the activation caches this model can reuse: blocks 1-4 are those).
    pub base_weights_digest: String,
    pub hidden: Option<usize>,
    pub history: Vec<EpochRecord>,
    pub config: Option<TrainConfig>,
}

fn cifar32() -> String {
    crate::data::Resize::Cifar32.name().to_string()
}

impl ModelMeta {
    /// The resize policy (checked by [`ModelMeta::check`]).
    pub fn resize(&self) -> crate::data::Resize {
        crate::data::Resize::parse(&self.resize).unwrap_or(crate::data::Resize::Cifar32)
    }

    /// Every field within what this program can run; the reason otherwise.
    pub fn check(&self) -> Result<(), String> {
        if !matches!(self.stage, 1 | 2) {
            return Err(format!("stage {} (expected 1 or 2)", self.stage));
        }
        crate::model::vgg::check_image_size(self.image_size).map_err(|_| {
            format!(
                "image_size {} (expected a positive multiple of 32 up to {})",
                self.image_size,
                crate::model::vgg::MAX_IMAGE_SIZE
            )
        })?;
        if self.preprocessing != crate::data::image::PREPROCESSING {
            return Err(format!(
                "preprocessing {:?} (this program applies {:?})",
                self.preprocessing,
                crate::data::image::PREPROCESSING
            ));
        }
        if crate::data::Resize::parse(&self.resize).is_none() {
            return Err(format!(
                "resize {:?} (expected cifar32, stretch or center-crop)",
                self.resize
            ));
        }
        let n = self.class_names.len();
        if n < 2 {
            return Err(format!("{n} class names (a classifier needs at least 2)"));
        }
        if self.class_names.iter().any(|c| c.trim().is_empty()) {
            return Err("an empty class name".into());
        }
        if self.hidden == Some(0) {
            return Err("hidden 0 (a hidden layer needs at least 1 unit)".into());
        }
        if self.base_weights_digest.len() != 64 || !self.base_weights_digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "base_weights_digest {:?} is not a SHA-256",
                self.base_weights_digest
            ));
        }
        if let Some(c) = &self.config {
            c.check().map_err(|e| format!("config: {e}"))?;
            if c.image_size != self.image_size || c.classes != n || c.hidden != self.hidden {
                return Err(format!(
                    "config (image size {}, {} classes, hidden {:?}) disagrees with the model (image size {}, {n} classes, hidden {:?})",
                    c.image_size, c.classes, c.hidden, self.image_size, self.hidden
                ));
            }
        }
        Ok(())
    }
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
        SavedModel {
            base: base.with_block5(block5),
            head: head.folded(),
            meta,
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.meta).expect("plain data");
        crate::atomic_write(path, |f| {
            let mut npz = NpzOut::new(f);
            npz.convs(convs().map(|(_, name, _, _)| name.to_string()).zip(&self.base.convs))?;
            if let Some(h) = &self.head.hidden {
                npz.add("dense/kernel", &h.w)?;
                npz.add("dense/bias", &h.b)?;
            }
            npz.add("classification/kernel", &self.head.out.w)?;
            npz.add("classification/bias", &self.head.out.b)?;
            npz.add("meta", &Array1::from(json.clone()))?;
            npz.finish()
        })
        .at("cannot write model", path)
    }

    pub fn load(path: &Path) -> Result<SavedModel> {
        let path = resolve(path);
        let bad = |msg: String| Error::invalid(&path, msg);
        if !path.is_file() {
            return Err(bad(
                "no such model file (a model.npz written by `vgg16 train`, or its run directory)".into(),
            ));
        }
        let mut npz = NpzIn::open(&path)?;
        if !npz.has("meta") {
            return Err(bad(
                "not a vgg16-cpu model (no 'meta' array; base weights alone are not a model)".into(),
            ));
        }
        let raw: Array1<u8> = npz.raw("meta")?;
        let mut meta: ModelMeta = serde_json::from_slice(raw.as_slice().unwrap_or_default())
            .map_err(|e| bad(format!("'meta' is not valid model metadata ({e})")))?;
        meta.config = meta.config.map(TrainConfig::upgrade);
        if meta.format != FORMAT || meta.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "model format {} version {}, this program reads {FORMAT} version {FORMAT_VERSION}",
                meta.format, meta.format_version
            )));
        }
        meta.check().map_err(|msg| bad(format!("'meta': {msg}")))?;
        let classes = meta.class_names.len();
        let mut dense = |name: &str, rows: usize, cols: usize| -> Result<Dense> {
            let w: Array2<f32> = npz.raw(&format!("{name}/kernel"))?;
            let b: Array1<f32> = npz.raw(&format!("{name}/bias"))?;
            if w.dim() != (rows, cols) || b.len() != cols {
                return Err(bad(format!(
                    "'{name}' has kernel {:?} and bias ({},), expected ({rows}, {cols}) and ({cols},)",
                    w.dim(),
                    b.len()
                )));
            }
            if w.iter().chain(b.iter()).any(|v| !v.is_finite()) {
                return Err(bad(format!("'{name}' holds NaN or infinite values")));
            }
            Ok(Dense { w, b })
        };
        let hidden = match meta.hidden {
            Some(h) => Some(dense("dense", 512, h)?),
            None => None,
        };
        let out = dense("classification", meta.hidden.unwrap_or(512), classes)?;
        let convs = convs()
            .map(|(_, name, cin, cout)| npz.conv(name, cin, cout))
            .collect::<Result<_, _>>()?;
        let dropout = meta.config.as_ref().map_or(0.0, |c| c.dropout);
        Ok(SavedModel {
            base: Vgg16 { convs },
            head: Head {
                hidden,
                out,
                dropout,
                norm: None,
            },
            meta,
        })
    }

    pub fn block5(&self) -> &[ConvParams] {
        self.base.block5()
    }
}
