//! Spare activation buffers, reused across layers and batches.
//!
//! At 224 px a layer's output is up to 205 MB (batch 16). Allocated fresh
//! for every layer of every batch, each one is new pages from the OS, which
//! the kernel zeroes on first touch: in a profile of the whole forward pass
//! (`examples/pass_layers`) page faults and `clear_page` took 17% of the
//! time. A [`BufferPool`] keeps the buffers a pass frees and hands them to
//! the next outputs, so after the first batch no layer touches a fresh page.
//! Buffers are plain initialised `Vec<f32>` (stale values from an earlier
//! layer): every writer overwrites the part it uses, and no unsafe length
//! games are played.

use std::sync::Mutex;

/// A bounded set of spare `f32` buffers; see the module docs.
pub struct BufferPool {
    spare: Mutex<Vec<Vec<f32>>>,
    max: usize,
}

impl BufferPool {
    /// A pool that keeps at most `max` spare buffers (the largest ones).
    pub fn new(max: usize) -> BufferPool {
        BufferPool {
            spare: Mutex::new(Vec::new()),
            max,
        }
    }

    /// A buffer of at least `len` floats, holding stale values: the
    /// smallest spare that is long enough, else a fresh zeroed one of
    /// exactly `len`. Callers use (and must overwrite) `[..len]`.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let best = spare
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => spare.swap_remove(i),
            None => vec![0.0; len],
        }
    }

    /// Returns `buf` for reuse; beyond `max` spares, the shortest is freed.
    pub fn give(&self, buf: Vec<f32>) {
        if self.max == 0 || buf.is_empty() {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        spare.push(buf);
        if spare.len() > self.max {
            let (i, _) = spare
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.len())
                .expect("more than max >= 1 spares");
            spare.swap_remove(i);
        }
    }

    /// Floats held in spare buffers.
    pub fn held(&self) -> usize {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        spare.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_smallest_spare_that_fits_and_keeps_the_largest() {
        let pool = BufferPool::new(2);
        assert_eq!(pool.take(5), vec![0.0; 5], "an empty pool allocates zeros");
        pool.give(vec![1.0; 10]);
        pool.give(vec![2.0; 4]);
        pool.give(vec![3.0; 7]);
        // max 2: the 4-float spare was dropped.
        assert_eq!(pool.held(), 17);
        let b = pool.take(6);
        assert_eq!((b.len(), b[0]), (7, 3.0), "best fit, stale values");
        let b = pool.take(8);
        assert_eq!((b.len(), b[0]), (10, 1.0));
        assert_eq!(pool.held(), 0);
        assert_eq!(pool.take(3).len(), 3, "nothing spare: a fresh buffer");
        pool.give(Vec::new());
        assert_eq!(pool.held(), 0, "empty buffers are not kept");
        let none = BufferPool::new(0);
        none.give(vec![1.0; 3]);
        assert_eq!(none.held(), 0);
    }
}
