//! What a run records as it goes: one [`EpochRecord`] per epoch (history.csv)
//! and one [`StageResult`] per finished stage (metrics.json, comparison).

use crate::error::{IoContext, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One row of history.csv.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub stage: u8,
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Test metrics at the end of a stage.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageResult {
    pub stage: u8,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub seconds: f64,
    pub epochs: usize,
    pub images_per_second: f64,
}

pub const HISTORY_HEADER: &str =
    "stage,epoch,train_loss,train_accuracy,val_loss,val_accuracy,seconds,images_per_second";

/// history.csv's text.
pub fn history_csv(history: &[EpochRecord]) -> String {
    let mut s = String::from(HISTORY_HEADER);
    s.push('\n');
    for r in history {
        s.push_str(&format!(
            "{},{},{:.6},{:.6},{:.6},{:.6},{:.3},{:.1}\n",
            r.stage,
            r.epoch,
            r.train_loss,
            r.train_accuracy,
            r.val_loss,
            r.val_accuracy,
            r.seconds,
            r.images_per_second
        ));
    }
    s
}

/// Writes history.csv at `path` (atomically).
pub fn write_history(path: &Path, history: &[EpochRecord]) -> Result<()> {
    write_text(path, &history_csv(history))
}

/// Writes a text file atomically.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::atomic_write(path, |f| f.write_all(text.as_bytes())).at("cannot write", path)
}
