//! Conv parameters in `.npz` files, read and written in one place: the
//! base weights, the saved model and checkpoints all name a layer's arrays
//! `<prefix><layer>/kernel` (3, 3, Cin, Cout) and `<prefix><layer>/bias`
//! (Cout), Keras's names and layout (checkpoints add `velocity/` for the
//! optimizer's state).

use ndarray::{Array1, Array4, ArrayBase, ArrayD, Data, Dimension, Ix1, Ix4};
use ndarray_npy::{NpzReader, NpzWriter, WritableElement};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WeightsError {
    #[error("{path}: cannot read weights: {msg}")]
    Read { path: PathBuf, msg: String },
    #[error("{path}: missing array '{key}'")]
    Missing { path: PathBuf, key: String },
    #[error("{path}: array '{key}' has shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: array '{key}' holds {bad} NaN or infinite values")]
    NotFinite { path: PathBuf, key: String, bad: usize },
    #[error("{path}: cannot write weights: {msg}")]
    Write { path: PathBuf, msg: String },
}

/// One conv layer's parameters: kernel (3, 3, Cin, Cout), bias (Cout).
#[derive(Clone, Debug)]
pub struct ConvParams {
    pub w: Array4<f32>,
    pub b: Array1<f32>,
}

/// An `.npz` being read: every array checked for presence, shape and
/// finite values, errors naming the file and the key.
pub struct NpzIn {
    npz: NpzReader<File>,
    names: Vec<String>,
    path: PathBuf,
}

impl NpzIn {
    pub fn open(path: &Path) -> Result<NpzIn, WeightsError> {
        let read = |msg: String| WeightsError::Read {
            path: path.to_path_buf(),
            msg,
        };
        let f = File::open(path).map_err(|e| read(e.to_string()))?;
        let mut npz = NpzReader::new(f).map_err(|e| read(format!("not a valid .npz ({e})")))?;
        let names = npz.names().map_err(|e| read(e.to_string()))?;
        Ok(NpzIn {
            npz,
            names,
            path: path.to_path_buf(),
        })
    }

    pub fn has(&self, key: &str) -> bool {
        self.names.iter().any(|n| n == key)
    }

    /// `<name>/kernel` (3, 3, cin, cout) and `<name>/bias` (cout).
    pub fn conv(&mut self, name: &str, cin: usize, cout: usize) -> Result<ConvParams, WeightsError> {
        let w = self.array(&format!("{name}/kernel"), &[3, 3, cin, cout])?;
        let b = self.array(&format!("{name}/bias"), &[cout])?;
        Ok(ConvParams {
            w: w.into_dimensionality::<Ix4>().expect("shape checked"),
            b: b.into_dimensionality::<Ix1>().expect("shape checked"),
        })
    }

    /// The raw array `key` of any element type (e.g. the saved model's
    /// `meta` bytes), for the caller to check.
    pub fn raw<T: ndarray_npy::ReadableElement, D: Dimension>(
        &mut self,
        key: &str,
    ) -> Result<ndarray::Array<T, D>, WeightsError> {
        if !self.has(key) {
            return Err(WeightsError::Missing {
                path: self.path.clone(),
                key: key.to_string(),
            });
        }
        self.npz.by_name(key).map_err(|e| WeightsError::Read {
            path: self.path.clone(),
            msg: format!("array '{key}': {e}"),
        })
    }

    /// The f32 array `key`, which must have exactly `shape` and finite values.
    pub fn array(&mut self, key: &str, shape: &[usize]) -> Result<ArrayD<f32>, WeightsError> {
        let a: ArrayD<f32> = self.raw(key)?;
        let path = self.path.as_path();
        if a.shape() != shape {
            return Err(WeightsError::Shape {
                path: path.to_path_buf(),
                key: key.to_string(),
                got: a.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let bad = a.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(WeightsError::NotFinite {
                path: path.to_path_buf(),
                key: key.to_string(),
                bad,
            });
        }
        Ok(a)
    }
}

/// An `.npz` being written (uncompressed) into an open file; the caller
/// writes the file atomically ([`crate::atomic_write`]). Dropped without
/// [`NpzOut::finish`] (after an error), it abandons the file quietly: the
/// zip writer's own drop would try to finish it and print to stderr.
pub struct NpzOut<'f> {
    npz: Option<NpzWriter<BufWriter<&'f mut File>>>,
}

impl<'f> NpzOut<'f> {
    pub fn new(f: &'f mut File) -> NpzOut<'f> {
        NpzOut {
            npz: Some(NpzWriter::new(BufWriter::new(f))),
        }
    }

    pub fn add<S, D>(&mut self, key: impl Into<String>, a: &ArrayBase<S, D>) -> std::io::Result<()>
    where
        S: Data,
        S::Elem: WritableElement,
        D: Dimension,
    {
        let npz = self.npz.as_mut().expect("not finished");
        npz.add_array(key, a).map_err(std::io::Error::other)
    }

    /// `<name>/kernel` and `<name>/bias` for each (name, params).
    pub fn convs<'p>(&mut self, layers: impl IntoIterator<Item = (String, &'p ConvParams)>) -> std::io::Result<()> {
        for (name, p) in layers {
            self.add(format!("{name}/kernel"), &p.w)?;
            self.add(format!("{name}/bias"), &p.b)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        let npz = self.npz.take().expect("not finished");
        let mut inner = npz.finish().map_err(std::io::Error::other)?;
        inner.flush()
    }
}

impl Drop for NpzOut<'_> {
    fn drop(&mut self) {
        if let Some(npz) = self.npz.take() {
            std::mem::forget(npz);
        }
    }
}

impl ConvParams {
    /// Zeros of the same shapes (an optimizer's fresh velocity).
    pub fn zeros_like(&self) -> ConvParams {
        ConvParams {
            w: Array4::zeros(self.w.dim()),
            b: Array1::zeros(self.b.len()),
        }
    }
}
