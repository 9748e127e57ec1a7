//! Data parallelism: N processes ("ranks") train one model. Every global
//! batch is cut into `N * K` parts (K = `accumulate`); rank r computes the
//! gradients of parts `r*K .. (r+1)*K` one after another, the part sums are
//! summed over ranks in rank order, and every rank applies the same SGD
//! step, so the weights stay identical everywhere.
//!
//! The sum over ranks is [`sum_in_rank_order`]: a reduce-scatter by
//! all-to-all (rank j adds up slice j of every rank's buffer, ranks 0, 1,
//! ... N-1 in that order) and an all-gather of the summed slices. Each rank
//! sends and receives 2(N-1)/N of the buffer, as a ring allreduce does, and
//! the result is the plain left-to-right sum, whatever the message timing.
//! So N ranks with K = 1 reproduce one process with `accumulate = N` bit
//! for bit (tests/parallel.rs; with the `mpi` feature, tests/mpi.rs).
//!
//! [`Collective`] is the transport: [`Solo`] (one process), [`Threads`]
//! (ranks as threads of one process, for tests), and with the `mpi`
//! feature `crate::train::mpi::Mpi`.

use crate::error::{Error, Result};
use std::sync::{Arc, Barrier, Mutex};

/// The operations data parallelism needs from a transport. Called from
/// one thread per rank, every rank in the same order.
pub trait Collective {
    /// This process's rank, 0..size().
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// `send` holds size() consecutive slices, slice j of `counts[j]`
    /// floats for rank j (the same `counts` on every rank); `recv`
    /// (size() x counts[rank()] floats) gets slice rank() of every rank's
    /// `send`, rank i's at `i * counts[rank()]`.
    fn all_to_all(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()>;
    /// Rank i's `send` (`counts[i]` floats) goes to every rank's `recv` at
    /// offset `counts[..i].sum()`; `recv` holds `counts.sum()` floats.
    fn all_gather(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()>;
    /// Waits until every rank has reached this call.
    fn barrier(&self) -> Result<()>;
    /// Says what the transport is ("single process", "MPI, 4 ranks").
    fn describe(&self) -> String;
    /// Whether training may sum each layer's gradients over ranks while the
    /// layers below still run backward (the compute then moves to a helper
    /// thread; this one keeps every call to the transport). The results are
    /// the same either way; [`InTurn`] turns it off.
    fn overlap(&self) -> bool {
        self.size() > 1
    }
}

/// A transport with the overlap of gradient exchange and backward turned
/// off ([`Collective::overlap`]): backward ends, then the whole gradient is
/// summed at once. For measuring what the overlap hides
/// (`VGG16_OVERLAP=0` under MPI).
pub struct InTurn<C>(pub C);

impl<C: Collective> Collective for InTurn<C> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn all_to_all(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        self.0.all_to_all(send, counts, recv)
    }
    fn all_gather(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        self.0.all_gather(send, counts, recv)
    }
    fn barrier(&self) -> Result<()> {
        self.0.barrier()
    }
    fn describe(&self) -> String {
        format!("{}, exchange after backward", self.0.describe())
    }
    fn overlap(&self) -> bool {
        false
    }
}

/// One process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_to_all(&self, send: &[f32], _counts: &[usize], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather(&self, send: &[f32], _counts: &[usize], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "single process".into()
    }
}

/// Sums `buf` over ranks in place: element i becomes
/// `((buf_0[i] + buf_1[i]) + buf_2[i]) + ...` on every rank (the same
/// length everywhere).
pub fn sum_in_rank_order(c: &dyn Collective, buf: &mut [f32]) -> Result<()> {
    sum_in_rank_order_with(c, buf, &mut Vec::new())
}

/// [`sum_in_rank_order`] with the received slices in `scratch` (grown as
/// needed and kept by the caller, so repeated sums do not fault in fresh
/// pages). `buf` is sent and gathered into as it is: no copies of it.
pub fn sum_in_rank_order_with(c: &dyn Collective, buf: &mut [f32], scratch: &mut Vec<f32>) -> Result<()> {
    let n = c.size();
    if n == 1 {
        return Ok(());
    }
    let counts = slice_counts(buf.len(), n);
    let mine = counts[c.rank()];
    if scratch.len() < n * mine {
        scratch.resize(n * mine, 0.0);
    }
    let recv = &mut scratch[..n * mine];
    // Reduce-scatter: slice `rank` of every rank's buffer, summed in order.
    c.all_to_all(buf, &counts, recv)?;
    let (acc, rest) = recv.split_at_mut(mine);
    for from in rest.chunks_exact(mine.max(1)) {
        for (a, &b) in acc.iter_mut().zip(from) {
            *a += b;
        }
    }
    c.all_gather(acc, &counts, buf)
}

/// Lengths of the `n` consecutive slices a `len`-float buffer is cut into
/// for the reduce-scatter: `ceil(len / n)` each, the last ones shorter.
fn slice_counts(len: usize, n: usize) -> Vec<usize> {
    let chunk = len.div_ceil(n);
    (0..n).map(|j| len.saturating_sub(j * chunk).min(chunk)).collect()
}

/// Sums `count` segments over ranks ([`sum_in_rank_order`]) one at a
/// time, in the order `next` hands them over (the same order on every
/// rank); `next` may block until its segment exists. Returns the summed
/// segments (None if `next` ran dry first: its producer failed) and the
/// time spent in the sums, not counting the waits for `next`.
pub fn sum_segments(
    c: &dyn Collective,
    count: usize,
    mut next: impl FnMut() -> Option<Vec<f32>>,
) -> Result<(Option<Vec<Vec<f32>>>, std::time::Duration)> {
    let mut out = Vec::with_capacity(count);
    let mut busy = std::time::Duration::ZERO;
    let mut scratch = Vec::new();
    for _ in 0..count {
        let Some(mut seg) = next() else {
            return Ok((None, busy));
        };
        let t0 = std::time::Instant::now();
        sum_in_rank_order_with(c, &mut seg, &mut scratch)?;
        busy += t0.elapsed();
        out.push(seg);
    }
    Ok((Some(out), busy))
}

/// Time spent summing gradients over ranks in an epoch: in all (inside
/// the collective calls, which includes waiting there for slower ranks),
/// and the time from the end of this rank's backward to the end of the
/// exchange (what the overlap did not hide).
#[derive(Clone, Copy, Debug, Default)]
pub struct ExchangeClock {
    pub steps: usize,
    /// Steps whose exchange ran while backward did.
    pub overlapped: usize,
    pub total: std::time::Duration,
    pub exposed: std::time::Duration,
}

impl ExchangeClock {
    pub fn add(&mut self, total: std::time::Duration, exposed: std::time::Duration, overlapped: bool) {
        self.steps += 1;
        self.overlapped += overlapped as usize;
        self.total += total;
        self.exposed += exposed;
    }

    /// "gradient exchange 41.2 ms a step, 12.0 ms of it after backward
    /// (781 steps, 781 overlapped with backward)", or None when there was
    /// none.
    pub fn summary(&self) -> Option<String> {
        if self.steps == 0 {
            return None;
        }
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / self.steps as f64;
        Some(format!(
            "gradient exchange {:.1} ms a step, {:.1} ms of it after backward ({} steps, {} overlapped with backward)",
            ms(self.total),
            ms(self.exposed),
            self.steps,
            self.overlapped
        ))
    }
}

/// The rows of a `len`-row set each rank takes in a split evaluation:
/// whole batches of `batch`, contiguous, in rank order (so each row is
/// computed in the same batch as in one process, bit for bit).
pub fn rank_rows(len: usize, batch: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let batches = len.div_ceil(batch.max(1));
    let b0 = batches * rank / size;
    let b1 = batches * (rank + 1) / size;
    (b0 * batch).min(len)..(b1 * batch).min(len)
}

/// Rows computed by each rank ([`rank_rows`]) of a (len, width) matrix,
/// gathered to every rank in order.
pub fn gather_rows(c: &dyn Collective, mine: &[f32], len: usize, width: usize, batch: usize) -> Result<Vec<f32>> {
    let n = c.size();
    if n == 1 {
        return Ok(mine.to_vec());
    }
    let counts: Vec<usize> = (0..n).map(|r| rank_rows(len, batch, r, n).len() * width).collect();
    if mine.len() != counts[c.rank()] {
        return Err(Error::Config(format!(
            "rank {} computed {} values, its share is {}",
            c.rank(),
            mine.len(),
            counts[c.rank()]
        )));
    }
    let mut out = vec![0.0; len * width];
    c.all_gather(mine, &counts, &mut out)?;
    Ok(out)
}

/// The contiguous parts of a batch of `b` rows: part p is rows
/// `p*b/parts .. (p+1)*b/parts` (some empty when b < parts).
pub fn part_rows(b: usize, parts: usize, p: usize) -> std::ops::Range<usize> {
    (p * b / parts)..((p + 1) * b / parts)
}

/// Ranks as threads of one process, exchanging through shared slots: the
/// same algorithm as MPI on one machine, for tests without MPI.
pub struct Threads {
    rank: usize,
    shared: Arc<ThreadsShared>,
}

struct ThreadsShared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
}

impl Threads {
    /// `size` connected ranks, one to move into each thread.
    pub fn group(size: usize) -> Vec<Threads> {
        let shared = Arc::new(ThreadsShared {
            size,
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![vec![]; size]),
        });
        (0..size)
            .map(|rank| Threads {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Publishes `send`, waits for all, hands every rank's buffer to
    /// `read`, waits again (so no slot changes while another rank reads).
    fn exchange(&self, send: &[f32], read: impl FnOnce(&[Vec<f32>])) -> Result<()> {
        let s = &self.shared;
        s.slots.lock().map_err(|_| poisoned())?[self.rank] = send.to_vec();
        s.barrier.wait();
        read(&s.slots.lock().map_err(|_| poisoned())?);
        s.barrier.wait();
        Ok(())
    }
}

fn poisoned() -> Error {
    Error::Config("a rank thread panicked".into())
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_to_all(&self, send: &[f32], counts: &[usize], recv: &mut [f32]) -> Result<()> {
        let r = self.rank;
        let start: usize = counts[..r].iter().sum();
        let mine = counts[r];
        self.exchange(send, |all| {
            for (to, from) in recv.chunks_exact_mut(mine.max(1)).zip(all) {
                to.copy_from_slice(&from[start..start + mine]);
            }
        })
    }
    fn all_gather(&self, send: &[f32], _counts: &[usize], recv: &mut [f32]) -> Result<()> {
        self.exchange(send, |all| {
            let mut at = 0;
            for from in all {
                recv[at..at + from.len()].copy_from_slice(from);
                at += from.len();
            }
        })
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn describe(&self) -> String {
        format!("{} ranks as threads", self.shared.size)
    }
}
