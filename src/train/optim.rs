//! Stochastic gradient descent with momentum, Keras semantics:
//! `v = momentum * v - lr * g;  w = w + v` (momentum 0 is plain SGD).
//!
//! A velocity that decays below the smallest normal f32 is set to zero.
//! Weights whose gradient is exactly zero (units behind a dead ReLU) would
//! otherwise carry subnormal velocities for hundreds of steps, and every
//! arithmetic operation on a subnormal costs ~100 cycles on x86: measured,
//! this made stage 2 a third slower from its second epoch on. TensorFlow
//! flushes subnormals to zero on CPU too, so Keras's numbers do the same.

use rayon::prelude::*;

/// One SGD step over a flat parameter buffer and its velocity. Elementwise,
/// so splitting it over threads changes nothing in the result.
pub fn sgd_momentum_step(w: &mut [f32], v: &mut [f32], g: &[f32], lr: f32, momentum: f32) {
    assert_eq!(w.len(), g.len(), "sgd: {} weights but {} gradients", w.len(), g.len());
    assert_eq!(w.len(), v.len(), "sgd: {} weights but {} velocities", w.len(), v.len());
    const CHUNK: usize = 1 << 16;
    w.par_chunks_mut(CHUNK)
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|((w, v), g)| {
            for ((wi, vi), &gi) in w.iter_mut().zip(v.iter_mut()).zip(g) {
                let nv = momentum * *vi - lr * gi;
                *vi = if nv.abs() >= f32::MIN_POSITIVE { nv } else { 0.0 };
                *wi += *vi;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decayed_velocity_flushes_to_zero_not_subnormal() {
        let (mut w, mut v) = (vec![1.0f32; 3], vec![1e-37f32, -1e-37, 0.5]);
        for _ in 0..40 {
            sgd_momentum_step(&mut w, &mut v, &[0.0; 3], 0.1, 0.5);
            assert!(v.iter().all(|x| *x == 0.0 || x.is_normal()), "{v:?}");
        }
        assert_eq!(&v[..2], &[0.0, 0.0]);
    }

    #[test]
    fn keras_momentum_two_steps() {
        // By hand: v1 = -0.1*2 = -0.2, w1 = 0.8; v2 = 0.9*-0.2 - 0.1*2 = -0.38, w2 = 0.42.
        let (mut w, mut v) = (vec![1.0f32], vec![0.0f32]);
        sgd_momentum_step(&mut w, &mut v, &[2.0], 0.1, 0.9);
        assert!((w[0] - 0.8).abs() < 1e-6 && (v[0] + 0.2).abs() < 1e-6);
        sgd_momentum_step(&mut w, &mut v, &[2.0], 0.1, 0.9);
        assert!((w[0] - 0.42).abs() < 1e-6 && (v[0] + 0.38).abs() < 1e-6);
    }
}
