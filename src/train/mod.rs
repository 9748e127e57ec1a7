//! Training: the job ([`job::TrainJob`]: config -> run directory), the
//! two-stage epoch loop ([`recipe`]), the optimizer ([`optim`]) and
//! checkpoints ([`checkpoint`]).

pub mod checkpoint;
pub mod job;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod optim;
pub mod parallel;
pub mod recipe;

pub use checkpoint::{load_checkpoint, save_checkpoint};
pub use job::{TrainJob, TrainOutcome};
pub use recipe::{run, Inputs, State};
