//! The MPI transport of [`Collective`] (cargo feature `mpi`: rsmpi over
//! the system's MPI library). MPI is initialised with
//! `MPI_THREAD_FUNNELED`: rayon's worker threads compute, only the thread
//! that called [`Mpi::init`] talks to MPI.

use crate::error::{Error, Result};
use crate::train::parallel::Collective;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

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
    fn all_to_all(&self, send: &[f32], chunk: usize) -> Result<Vec<f32>> {
        let mut recv = vec![0f32; chunk * self.size()];
        self.world.all_to_all_into(send, &mut recv[..]);
        Ok(recv)
    }
    fn all_gather(&self, send: &[f32]) -> Result<Vec<f32>> {
        let mut recv = vec![0f32; send.len() * self.size()];
        self.world.all_gather_into(send, &mut recv[..]);
        Ok(recv)
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn describe(&self) -> String {
        format!("MPI, {} ranks (this is rank {})", self.size(), self.rank())
    }
}
