//! Stochastic gradient descent with momentum, Keras semantics:
//! `v = momentum * v - lr * g;  w = w + v` (momentum 0 is plain SGD).

/// One SGD step over a flat parameter buffer and its velocity.
pub fn sgd_momentum_step(w: &mut [f32], v: &mut [f32], g: &[f32], lr: f32, momentum: f32) {
    assert_eq!(
        w.len(),
        g.len(),
        "sgd: {} weights but {} gradients",
        w.len(),
        g.len()
    );
    assert_eq!(
        w.len(),
        v.len(),
        "sgd: {} weights but {} velocities",
        w.len(),
        v.len()
    );
    for ((wi, vi), &gi) in w.iter_mut().zip(v.iter_mut()).zip(g) {
        *vi = momentum * *vi - lr * gi;
        *wi += *vi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
