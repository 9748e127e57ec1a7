//! The MPI transport of [`Collective`] (cargo feature `mpi`: rsmpi over
//! the system's MPI library). MPI is initialised with
//! `MPI_THREAD_FUNNELED`: rayon's worker threads compute, only the thread
//! that called [`Mpi::init`] talks to MPI.

use crate::error::{Error, Result};
use crate::train::parallel::Collective;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

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
        })
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
        self.world.all_to_all_varcount_into(&send, &mut recv);
        Ok(())
    }
    fn all_gather(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let (recv_counts, recv_displs) = partition(counts)?;
        let mut recv = PartitionMut::new(recv, recv_counts, recv_displs);
        self.world.all_gather_varcount_into(send, &mut recv);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn describe(&self) -> String {
        format!("MPI, {} ranks (this is rank {})", self.size(), self.rank())
    }
}
