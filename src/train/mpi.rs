//! The MPI transport of [`Collective`] (cargo feature `mpi`: rsmpi over
//! the system's MPI library). MPI is initialised with
//! `MPI_THREAD_FUNNELED`: rayon's worker threads compute, only the thread
//! that called [`Mpi::init`] talks to MPI.
//!
//! While backward runs beside the exchange ([`Collective::overlap`]) the
//! two collectives are MPI's non-blocking ones, tested every
//! [`poll_interval`] with the thread asleep in between: a blocking call
//! spins on a core while it waits, a core the compute needs. Otherwise
//! they block: nothing else runs then, and over shared memory the sleeps
//! slowed the exchange (two ranks on this 2-core machine, stage 2 at 224
//! px: 0.91-1.08x one process polled, 0.99-1.07x blocking; BENCHMARKS.md
//! 16.4).

use crate::error::{Error, Result};
use crate::train::parallel::Collective;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;
use std::time::Duration;

/// Sleep between two tests of a pending collective: `VGG16_MPI_POLL_US`
/// microseconds (default 100), or None (0) for MPI's blocking calls. Each
/// test lets MPI move what it can (a shared-memory copy, a socket's worth
/// over TCP); sleeping longer leaves the link idle, shorter costs a
/// wake-up more often.
pub fn poll_interval() -> Option<Duration> {
    static P: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        let us = match std::env::var("VGG16_MPI_POLL_US") {
            Ok(v) => v.trim().parse::<u64>().unwrap_or_else(|_| {
                eprintln!("warning: VGG16_MPI_POLL_US={v:?} is not a number of microseconds; using 100");
                100
            }),
            Err(_) => 100,
        };
        (us > 0).then(|| Duration::from_micros(us))
    })
}

/// Completes `req`: blocking without `nap`, else asleep for `nap`
/// between tests.
fn complete<'a, D: ?Sized, S: mpi::request::Scope<'a>>(req: mpi::request::Request<'a, D, S>, nap: Option<Duration>) {
    let Some(nap) = nap else {
        req.wait_without_status();
        return;
    };
    let mut req = req;
    loop {
        match req.test() {
            Ok(_) => return,
            Err(pending) => {
                req = pending;
                std::thread::sleep(nap);
            }
        }
    }
}

/// MPI's counts and displacements (C ints) of consecutive slices.
fn partition(counts: &[usize]) -> Result<(Vec<Count>, Vec<Count>)> {
    let too_big = || Error::Config("a gradient exchange of over 2^31 floats per rank".into());
    let mut displs = Vec::with_capacity(counts.len());
    let mut at: usize = 0;
    for &c in counts {
        displs.push(Count::try_from(at).map_err(|_| too_big())?);
        at += c;
    }
    let counts = counts
        .iter()
        .map(|&c| Count::try_from(c).map_err(|_| too_big()))
        .collect::<Result<Vec<_>>>()?;
    Ok((counts, displs))
}

/// MPI_COMM_WORLD of an initialised MPI (finalised on drop).
pub struct Mpi {
    _universe: Universe,
    world: SimpleCommunicator,
    /// Exchange during backward: Some(forced), or None to decide by the
    /// rank's threads ([`Collective::overlap`]).
    overlap: Option<bool>,
}

impl Mpi {
    /// Initialises MPI (once per process). Under `mpirun`/`srun` the
    /// world is the job's ranks; started alone, a world of one.
    pub fn init() -> Result<Mpi> {
        let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Config("MPI is already initialised in this process".into()))?;
        let world = universe.world();
        Ok(Mpi {
            _universe: universe,
            world,
            overlap: None,
        })
    }

    /// Forces the gradient exchange during backward (`Some(true)`), after it
    /// (`Some(false)`), or leaves it to the rank's threads (None, the
    /// default; see [`Collective::overlap`]).
    pub fn with_overlap(mut self, overlap: Option<bool>) -> Mpi {
        self.overlap = overlap;
        self
    }

    /// Whether this process was started by an MPI launcher (mpirun, srun
    /// with PMI): its environment says so.
    pub fn launched() -> bool {
        ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
    }

    /// Ranks on this node (OpenMPI's OMPI_COMM_WORLD_LOCAL_SIZE, Slurm's
    /// SLURM_NTASKS_PER_NODE), if the launcher says.
    pub fn local_size() -> Option<usize> {
        ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse().ok())
    }

    /// How a collective waits: asleep between tests while backward runs
    /// beside it, else blocking.
    fn nap(&self) -> Option<Duration> {
        if self.overlap() {
            poll_interval()
        } else {
            None
        }
    }

    /// Ends every rank of the job at once (after an error on one).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_to_all(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let n = self.size();
        let mine = counts[self.rank()];
        let (send_counts, send_displs) = partition(counts)?;
        let (recv_counts, recv_displs) = partition(&vec![mine; n])?;
        let send = Partition::new(send, send_counts, send_displs);
        let mut recv = PartitionMut::new(recv, recv_counts, recv_displs);
        mpi::request::scope(|scope| {
            complete(
                self.world.immediate_all_to_all_varcount_into(scope, &send, &mut recv),
                self.nap(),
            );
        });
        Ok(())
    }
    fn all_gather(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let (recv_counts, recv_displs) = partition(counts)?;
        let mut recv = PartitionMut::new(recv, recv_counts, recv_displs);
        mpi::request::scope(|scope| {
            complete(
                self.world.immediate_all_gather_varcount_into(scope, send, &mut recv),
                self.nap(),
            );
        });
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn describe(&self) -> String {
        let how = match self.overlap {
            Some(true) => ", exchange during backward",
            Some(false) => ", exchange after backward",
            None => "",
        };
        format!("MPI, {} ranks (this is rank {}){how}", self.size(), self.rank())
    }

    /// During backward only when the rank computes on two or more threads
    /// (unless forced): a rank on one core has nothing to run the exchange
    /// beside, and the switching cost it (two single-threaded ranks on this
    /// 2-core machine, stage 2 at 224 px: 0.81-0.88x one process
    /// overlapped, 0.96-1.08x after backward; BENCHMARKS.md 16).
    fn overlap(&self) -> bool {
        self.size() > 1 && self.overlap.unwrap_or_else(|| rayon::current_num_threads() >= 2)
    }
}
