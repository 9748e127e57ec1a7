//! How a running job reports: the library never prints; it tells an
//! [`Observer`] what happens, and the caller decides what to show. The
//! command line's progress bars and log lines are one observer
//! (`src/cli/progress.rs`); tests record events with another; a Rust user
//! who wants silence passes [`Silent`].

use crate::report::history::{EpochRecord, StageResult};

/// Receives a job's events, in order. Every method has an empty default.
pub trait Observer {
    /// A status line meant for a person, e.g. "cache: using data/cache/...".
    fn info(&mut self, _line: &str) {}
    /// A phase of `total` items of `unit` ("img") starts, e.g. "cache" or
    /// "stage 2 epoch 3/5". Phases do not nest.
    fn begin(&mut self, _task: &str, _total: u64, _unit: &'static str) {}
    /// `n` more items of the current phase are done; `msg` is a short
    /// running summary (e.g. "loss 1.2345 acc 0.5000"), possibly empty.
    fn advance(&mut self, _n: u64, _msg: &str) {}
    /// The current phase ended.
    fn end(&mut self) {}
    /// Epoch `rec.epoch` of `epochs` in stage `rec.stage` finished.
    fn epoch(&mut self, _rec: &EpochRecord, _epochs: usize) {}
    /// A stage finished and was tested.
    fn stage_done(&mut self, _result: &StageResult) {}
}

/// Reports nothing.
pub struct Silent;

impl Observer for Silent {}
