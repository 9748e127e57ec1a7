//! Times the parts of one block5 layer's training step on the path the
//! dispatch takes (`VGG16_CONV`, `VGG16_ISA` force one), for finding what a
//! small step pays once per step:
//! `cargo run --release --example step_parts -- SIDE BATCH[,BATCH..] [REPS]`.
//! Prints the medians (ms) of: refilling the forward kernel and dX's
//! (flipped) kernel, the forward, dW (+ db) and dX, for Cin = Cout = 512.
use ndarray::{Array1, Array4};
use std::time::Instant;
use vgg16_cpu::tensor::conv::{conv3x3_backward_prepared, conv3x3_forward_prepared, conv3x3_forward_step, KernelSlot};
use vgg16_cpu::tensor::dispatch::{ConvAlgo, Dispatch};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 2 {
        eprintln!("usage: step_parts SIDE BATCH[,BATCH..] [REPS]");
        std::process::exit(2);
    }
    let s: usize = a[0].parse().expect("SIDE");
    let reps: usize = a.get(2).map_or(7, |r| r.parse().expect("REPS"));
    let c = 512;
    let d = Dispatch::global();
    println!("{}", d.describe());
    let w = Array4::from_shape_fn((3, 3, c, c), |(i, j, k, l)| {
        ((i + 2 * j + 3 * k + 5 * l) % 11) as f32 * 0.01 - 0.05
    });
    let b = Array1::<f32>::zeros(c);
    for n in a[1].split(',').map(|v| v.parse::<usize>().expect("BATCH")) {
        let x = Array4::from_shape_fn((n, s, s, c), |(i, j, k, l)| {
            ((i + 3 * j + 5 * k + 7 * l) % 13) as f32 * 0.1 - 0.6
        });
        let path = d.path_unprepared(ConvAlgo::Auto, n, s, s, c);
        let (mut fwd, mut dxk) = (KernelSlot::default(), KernelSlot::default());
        let mut t: Vec<[f64; 5]> = Vec::new();
        for _ in 0..reps + 1 {
            let ms = |t0: Instant| t0.elapsed().as_secs_f64() * 1e3;
            let t0 = Instant::now();
            fwd.prepare(path, w.view(), false);
            let prep = ms(t0);
            let t0 = Instant::now();
            dxk.prepare(path, w.view(), true);
            let prep_dx = ms(t0);
            let t0 = Instant::now();
            let y = match fwd.get() {
                Some(k) => conv3x3_forward_prepared(x.view(), k, Some(b.view()), true),
                None => conv3x3_forward_step(x.view(), w.view(), Some(b.view()), true),
            };
            let f = ms(t0);
            let t0 = Instant::now();
            let g = conv3x3_backward_prepared(x.view(), w.view(), y.view(), false, None);
            let dw = ms(t0);
            let t0 = Instant::now();
            let gx = conv3x3_backward_prepared(x.view(), w.view(), y.view(), true, dxk.get());
            let dwdx = ms(t0);
            std::hint::black_box((g, gx));
            t.push([prep, prep_dx, f, dw, dwdx - dw]);
        }
        t.remove(0);
        let med = |k: usize| {
            let mut v: Vec<f64> = t.iter().map(|r| r[k]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "{} side {s} batch {n}: prepare {:.1} + dX kernel {:.1}, forward {:.1}, dW {:.1}, dX ~{:.1} ms",
            path.name(),
            med(0),
            med(1),
            med(2),
            med(3),
            med(4)
        );
    }
}
