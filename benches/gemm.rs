//! SGEMM GFLOP/s at VGG-16's im2col shapes, every backend side by side.
//! `cargo bench --bench gemm` (criterion reports elements/s = FLOP/s).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::Array2;
use std::time::Duration;
use vgg16_cpu::bench::GEMM_SHAPES;
use vgg16_cpu::tensor::gemm::{sgemm_with, Backend};

fn gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("sgemm");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for s in GEMM_SHAPES {
        let a = Array2::from_shape_fn((s.m, s.k), |(i, j)| ((i * 7 + j * 3) % 17) as f32 * 0.01);
        let b = Array2::from_shape_fn((s.k, s.n), |(i, j)| ((i * 5 + j * 11) % 13) as f32 * 0.01);
        let mut out = Array2::<f32>::zeros((s.m, s.n));
        group.throughput(Throughput::Elements((2 * s.m * s.k * s.n) as u64));
        for backend in Backend::available() {
            let id = format!("{}/{}x{}x{}/{}", s.name, s.m, s.k, s.n, backend.name());
            group.bench_function(id, |bch| {
                bch.iter(|| sgemm_with(backend, a.view(), b.view(), out.view_mut(), false))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, gemm);
criterion_main!(benches);
