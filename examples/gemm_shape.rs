//! Times one SGEMM shape on each backend this CPU runs, best of several:
//! `cargo run --release --example gemm_shape -- M K N [THREADS] [REPS]`.

use ndarray::Array2;
use std::time::Instant;
use vgg16_cpu::tensor::gemm::{flops, sgemm_with, Backend};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are numbers: M K N [THREADS] [REPS]"))
        .collect();
    let (m, k, n) = match args[..] {
        [m, k, n, ..] => (m, k, n),
        _ => panic!("usage: gemm_shape M K N [THREADS] [REPS]"),
    };
    let threads = args.get(3).copied().unwrap_or(1);
    let reps = args.get(4).copied().unwrap_or(5);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let a = Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 17) as f32 * 0.01);
    let b = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j * 11) % 13) as f32 * 0.01);
    let mut c = Array2::<f32>::zeros((m, n));
    for backend in Backend::available() {
        let best = (0..reps)
            .map(|_| {
                let t = Instant::now();
                pool.install(|| sgemm_with(backend, a.view(), b.view(), c.view_mut(), false));
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        println!(
            "{m}x{k}x{n} {threads} thread(s) {}: {:.1} GFLOP/s",
            backend.name(),
            flops(m, k, n) / best / 1e9
        );
    }
}
