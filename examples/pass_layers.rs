//! Time of each layer inside the whole forward pass, batch after batch (the
//! cost a layer has in `vgg16 extract`, fresh outputs and all, rather than
//! alone in a loop as `vgg16 bench conv` times it):
//! `cargo run --release --example pass_layers -- WEIGHTS SIZE BATCH BATCHES`
//! Prints, per layer, the median and the fastest of the batches after the
//! first (ms; the fastest is what `scripts/ort_layers.py` reports). A
//! conv fused with the max-pool after it (as `vgg16 extract` and the cache
//! build run it) shows as "fused", its time in the pool's line; `UNFUSED=1`
//! keeps every output.
use ndarray::Array4;
use std::time::Instant;
use vgg16_cpu::model::vgg::{Vgg16, LAYERS};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 4 {
        eprintln!("usage: pass_layers WEIGHTS SIZE BATCH BATCHES");
        std::process::exit(2);
    }
    let num = |i: usize| -> usize { a[i].parse().expect("a number") };
    let (s, n, batches) = (num(1), num(2), num(3).max(2));
    let model = Vgg16::load_npz(std::path::Path::new(&a[0])).expect("weights");
    let net = model.prepare();
    let mut times = vec![Vec::new(); LAYERS.len()];
    let mut totals = Vec::new();
    let unfused = std::env::var_os("UNFUSED").is_some_and(|v| v == "1");
    for b in 0..batches {
        let x = Array4::from_shape_fn((n, s, s, 3), |(i, j, k, l)| {
            ((i + 3 * j + 5 * k + 7 * l + b) % 251) as f32 - 125.0
        });
        let start = Instant::now();
        let mut t = start;
        let y = net.forward_layers(x, 0..LAYERS.len(), &|_| unfused, &mut |i, _| {
            let now = Instant::now();
            if b > 0 {
                times[i].push((now - t).as_secs_f64() * 1e3);
            }
            t = now;
        });
        std::hint::black_box(&y);
        if b > 0 {
            totals.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut fastest_sum = 0.0;
    for (i, l) in LAYERS.iter().enumerate() {
        match times[i].is_empty() {
            true => println!("{:14} {:>8}", l.name, "fused"),
            false => {
                let med = median(&mut times[i]);
                fastest_sum += times[i][0];
                println!("{:14} {med:8.1} ms (fastest {:.1})", l.name, times[i][0]);
            }
        }
    }
    let total = median(&mut totals);
    println!(
        "{:14} {total:8.1} ms per batch of {n} ({:.2} img/s); fastest per layer, summed: {fastest_sum:.1} ms",
        "total",
        n as f64 * 1e3 / total
    );
}
