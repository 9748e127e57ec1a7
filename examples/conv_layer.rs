//! Times one conv layer on one path, for profiling:
//! `cargo run --release --example conv_layer -- PATH SIZE BATCH CIN COUT [REPS]`
//! with PATH one of direct, winograd, im2col, tap_classes (on this CPU's best ISA).
//! `VGG16_ISA` forces the instruction set; `PREALLOC=1` reuses one output buffer;
//! `POOL=1` times the direct kernel fused with a 2x2 max-pool.
use ndarray::{Array1, Array2, Array4};
use std::time::Instant;
use vgg16_cpu::tensor::conv::{
    conv3x3_forward_path, conv3x3_forward_prepared, forward_flops, ConvPath, PreparedKernel,
};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 5 {
        eprintln!("usage: conv_layer direct|winograd|im2col|tap_classes SIZE BATCH CIN COUT [REPS]");
        std::process::exit(2);
    }
    let num = |i: usize| -> usize { a[i].parse().expect("a number") };
    let (s, n, cin, cout) = (num(1), num(2), num(3), num(4));
    let reps = if a.len() > 5 { num(5) } else { 5 };
    // VGG16_ISA forces the instruction set, as in the program.
    let isa = vgg16_cpu::tensor::dispatch::Dispatch::from_env()
        .expect("VGG16_ISA")
        .isa;
    let path = match a[0].as_str() {
        "direct" => ConvPath::Direct(isa),
        "winograd" => ConvPath::Winograd(isa),
        "im2col" => ConvPath::Im2col,
        "tap_classes" => ConvPath::TapClasses,
        p => panic!("unknown path {p}"),
    };
    let x = Array4::from_shape_fn((n, s, s, cin), |(i, j, k, l)| {
        ((i + 3 * j + 5 * k + 7 * l) % 13) as f32 * 0.1 - 0.6
    });
    let w = Array4::from_shape_fn((3, 3, cin, cout), |(i, j, k, l)| {
        ((i + 2 * j + 3 * k + 5 * l) % 11) as f32 * 0.01 - 0.05
    });
    let b = Array1::<f32>::zeros(cout);
    let mut out = Array2::<f32>::zeros((n * s * s, cout));
    // Kernels prepared once, as `Vgg16::prepare` does; the time is printed.
    let t = Instant::now();
    let prepared = PreparedKernel::new(path, w.view());
    let prep = t.elapsed().as_secs_f64();
    // PREALLOC=1: write every rep into one output allocated up front,
    // instead of a fresh one per rep as the program's forward pass does (a
    // fresh output of more than 32 MB is fresh pages from the OS each time).
    let prealloc = std::env::var_os("PREALLOC").is_some_and(|v| v == "1");
    // POOL=1 (direct only): the layer fused with a 2x2 max-pool, into one
    // preallocated quarter-size output.
    let pool = std::env::var_os("POOL").is_some_and(|v| v == "1");
    let mut pooled = vec![std::mem::MaybeUninit::new(0.0f32); n * s * s * cout / 4];
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        match &prepared {
            Some(PreparedKernel::Direct(k)) if pool => vgg16_cpu::tensor::direct::conv3x3_direct_pool2(
                x.as_slice().expect("standard"),
                (n, s, s, cin),
                k,
                b.as_slice(),
                true,
                &mut pooled,
            ),
            _ if pool => panic!("POOL=1 needs the direct path"),
            Some(k) if !prealloc => drop(conv3x3_forward_prepared(x.view(), k, Some(b.view()), true)),
            // The kernel packed again each rep (0.4-7 ms), into `out`.
            _ => conv3x3_forward_path(path, x.view(), w.view(), Some(b.view()), true, out.view_mut()),
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{} {s}x{s} batch {n} {cin}->{cout}: best {:.1} ms, {:.1} GFLOP/s (direct-equivalent), kernel prepared in {:.1} ms",
        path.name(),
        best * 1e3,
        forward_flops(n, s, s, cin, cout) / best / 1e9,
        prep * 1e3
    );
}
