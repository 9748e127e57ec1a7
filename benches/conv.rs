//! Conv forward per VGG-16 layer (im2col included) at 224 (batch 1) and
//! 32 (batch 64), and block5 backward (dW + dX) at 14x14, batch 8.
//! `cargo bench --bench conv` (criterion reports elements/s = FLOP/s).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::Array4;
use std::time::Duration;
use vgg16_cpu::bench::VGG_CONVS;
use vgg16_cpu::tensor::conv::{conv3x3_backward, conv3x3_forward, forward_flops};

fn filled(d: (usize, usize, usize, usize), scale: f32) -> Array4<f32> {
    Array4::from_shape_fn(d, |(a, b, c, e)| {
        (((a * 31 + b * 17 + c * 7 + e * 3) % 23) as f32 - 11.0) * scale
    })
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv_forward");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for &(size, batch) in &[(224usize, 1usize), (32, 64)] {
        for &(name, cin, cout, div) in VGG_CONVS {
            let hw = size / div;
            let x = filled((batch, hw, hw, cin), 0.05);
            let w = filled((3, 3, cin, cout), 0.01);
            let b = ndarray::Array1::<f32>::zeros(cout);
            group.throughput(Throughput::Elements(forward_flops(batch, hw, hw, cin, cout) as u64));
            group.bench_function(format!("{size}_b{batch}/{name}"), |bch| {
                bch.iter(|| conv3x3_forward(x.view(), w.view(), Some(b.view()), true))
            });
        }
    }
    group.finish();
}

fn backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv_backward");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let (batch, hw, ch) = (8, 14, 512);
    let x = filled((batch, hw, hw, ch), 0.05);
    let w = filled((3, 3, ch, ch), 0.01);
    let dz = filled((batch, hw, hw, ch), 0.02);
    // dW + dX: two GEMMs of the forward's size.
    group.throughput(Throughput::Elements(2 * forward_flops(batch, hw, hw, ch, ch) as u64));
    group.bench_function("14_b8/block5_conv2_dw_dx", |bch| {
        bch.iter(|| conv3x3_backward(x.view(), w.view(), dz.view(), true))
    });
    group.finish();
}

criterion_group!(benches, forward, backward);
criterion_main!(benches);
