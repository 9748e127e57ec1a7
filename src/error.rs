//! The library's error type. Every failure names the file or the setting
//! and what is wrong with it; the binary adds context and prints the chain
//! (`outer: inner`), so a variant's message never repeats its source.

use crate::data::cifar::DataError;
use crate::data::fetch::FetchError;
use crate::model::vgg::WeightsError;
use crate::tensor::dispatch::DispatchError;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// The operating system refused an operation on a named file
    /// ("cannot write runs/x/model.npz: No space left on device").
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file's content is not what it must be (a damaged cache, a model
    /// of another format, a checkpoint that does not parse).
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    /// A setting that cannot work (a batch size of 0, a layer name that
    /// does not exist, a record range past the end of a split).
    #[error("{0}")]
    Config(String),
    /// The plotting library failed to draw.
    #[error("plotting: {0}")]
    Plot(String),
    /// The loss stopped being a number.
    #[error("stage {stage} epoch {epoch}: the loss became {loss} (diverged); try a smaller learning rate")]
    Diverged { stage: u8, epoch: usize, loss: f32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `path: msg`.
    pub fn invalid(path: &Path, msg: impl Into<String>) -> Error {
        Error::Invalid {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn config(msg: impl Into<String>) -> Error {
        Error::Config(msg.into())
    }
}

/// An error and its sources, `outer: inner: ...` (as the binary prints it).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Names the file an I/O error happened on: `.at("cannot write", path)?`.
pub trait IoContext<T> {
    fn at(self, what: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, what: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            what,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Early return with [`Error::Config`], like `anyhow::bail!`.
#[macro_export]
macro_rules! config_bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Config(format!($($arg)*)))
    };
}
