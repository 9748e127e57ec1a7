//! What a run leaves for a person: history (per epoch, per stage), metrics
//! (accuracy, loss, confusion matrix, per-class report), plots and the stage
//! comparison. Depends only on plain records and `tensor::ops`.

pub mod comparison;
pub mod history;
pub mod metrics;
pub mod plots;
