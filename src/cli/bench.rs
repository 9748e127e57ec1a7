//! `vgg16 bench gemm|conv|input`: the library's measurements, one JSON object a line.

use super::with_threads;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use std::time::Duration;
use vgg16_cpu::tensor::gemm::Backend;

#[derive(Subcommand)]
pub enum BenchWhat {
    /// SGEMM GFLOP/s at VGG-16's im2col shapes, every backend.
    Gemm(BenchArgs),
    /// Conv forward per VGG-16 layer (im2col included) and block5 backward.
    Conv {
        #[command(flatten)]
        common: BenchArgs,
        /// Input image size (the layers run at size / 1, 2, 4, 8, 16).
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        /// Batch size.
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// One stage-2 training step (block5 + head forward, backward, SGD
    /// update) per batch size, timed by phase, with the moment backward
    /// hands over each layer's gradients (what data parallelism's
    /// overlapped exchange works with).
    Step {
        #[command(flatten)]
        common: BenchArgs,
        /// Input image size (block5 runs at size / 16).
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        /// Batch sizes, comma-separated (per rank: 64 / ranks in the recipe).
        #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64")]
        batch: Vec<usize>,
    },
    /// The input pipeline alone (read, decode, resize, preprocess) on a
    /// dataset's records: compare with the cache build's img/s.
    Input {
        #[command(flatten)]
        source: super::DataArgs,
        /// Input image size.
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        /// train or test.
        #[arg(long, default_value = "train")]
        split: String,
        /// How many records (from the first).
        #[arg(long, default_value_t = 512)]
        limit: usize,
        /// Images per batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// The gradient sum of data-parallel training (run it under mpirun
    /// with the `mpi` build): seconds per sum of block5 + head gradients
    /// in rank order, and the bytes each rank moves.
    Allreduce {
        /// Floats summed (default: block5 + the 10-class head, 7,084,554).
        #[arg(long, default_value_t = 7_084_554)]
        floats: usize,
        /// Timed repetitions (after one untimed).
        #[arg(long, default_value_t = 20)]
        repeats: usize,
    },
}

#[derive(Args)]
pub struct BenchArgs {
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Only this backend: own-avx512, own-avx2, own-generic, gemm or matrixmultiply
    /// (default: all this CPU runs for `bench gemm`, the default backend
    /// for `bench conv`).
    #[arg(long)]
    backend: Option<String>,
    /// Minimum seconds spent timing each case (median of the runs).
    #[arg(long, default_value_t = 1.0)]
    min_time: f64,
    /// `bench gemm`: only this shape (its name in the output; repeatable).
    #[arg(long)]
    shape: Vec<String>,
}

pub fn run(what: BenchWhat) -> Result<()> {
    match what {
        BenchWhat::Gemm(args) => with_threads(args.threads, || {
            let backends = backends(&args.backend)?;
            let all = vgg16_cpu::bench::GEMM_SHAPES;
            if let Some(bad) = args.shape.iter().find(|n| !all.iter().any(|s| &s.name == n)) {
                let names: Vec<&str> = all.iter().map(|s| s.name).collect();
                bail!("unknown --shape '{bad}' (expected one of: {})", names.join(", "));
            }
            let shapes: Vec<_> = all
                .iter()
                .filter(|s| args.shape.is_empty() || args.shape.iter().any(|n| n == s.name))
                .collect();
            vgg16_cpu::bench::bench_gemm(&backends, &shapes, Duration::from_secs_f64(args.min_time), |v| {
                println!("{v}")
            });
            Ok(())
        }),
        BenchWhat::Conv {
            common,
            image_size,
            batch,
        } => with_threads(common.threads, || {
            if common.backend.is_some() {
                bail!(
                    "bench conv uses the default backend ({}); --backend applies to bench gemm",
                    Backend::auto().name()
                );
            }
            let min_time = Duration::from_secs_f64(common.min_time);
            Ok(vgg16_cpu::bench::bench_conv(image_size, batch, min_time, |v| {
                println!("{v}")
            })?)
        }),
        BenchWhat::Input {
            source,
            image_size,
            split,
            limit,
            batch,
            threads,
        } => with_threads(threads, || {
            super::check_image_size(image_size)?;
            let split = vgg16_cpu::data::Split::parse(&split)
                .ok_or_else(|| anyhow::anyhow!("--split '{split}': expected train or test"))?;
            let data = super::open_data(&source)?.load(split)?;
            println!("{}", vgg16_cpu::bench::bench_input(&data, limit, image_size, batch)?);
            Ok(())
        }),
        BenchWhat::Step {
            common,
            image_size,
            batch,
        } => with_threads(common.threads, || {
            if common.backend.is_some() {
                bail!("bench step uses the default backend; --backend applies to bench gemm");
            }
            if batch.is_empty() || batch.contains(&0) {
                bail!("--batch {batch:?}: give batch sizes of at least 1, comma-separated");
            }
            vgg16_cpu::bench::bench_step(image_size, &batch, Duration::from_secs_f64(common.min_time), |v| {
                println!("{v}")
            })?;
            Ok(())
        }),
        BenchWhat::Allreduce { floats, repeats } => {
            let comm = super::collective()?;
            let r = bench_allreduce(&*comm, floats, repeats.max(1));
            super::end_rank(r, &*comm)
        }
    }
}

fn bench_allreduce(comm: &dyn vgg16_cpu::train::parallel::Collective, floats: usize, repeats: usize) -> Result<()> {
    use vgg16_cpu::train::parallel::sum_in_rank_order;
    let mut buf: Vec<f32> = (0..floats)
        .map(|i| ((i % 1000) as f32) * 1e-3 + comm.rank() as f32)
        .collect();
    sum_in_rank_order(comm, &mut buf)?;
    let mut secs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        comm.barrier()?;
        let t = std::time::Instant::now();
        sum_in_rank_order(comm, &mut buf)?;
        secs.push(t.elapsed().as_secs_f64());
    }
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    let n = comm.size() as f64;
    // Each rank sends (and receives) (n-1)/n of the buffer twice: the
    // all-to-all of the reduce-scatter and the all-gather.
    let moved = 2.0 * (n - 1.0) / n * floats as f64 * 4.0;
    if comm.rank() == 0 {
        println!(
            "{}",
            serde_json::json!({
                "bench": "allreduce",
                "transport": comm.describe(),
                "ranks": comm.size(),
                "floats": floats,
                "bytes": floats * 4,
                "bytes_moved_per_rank": moved,
                "seconds_median": median,
                "seconds_min": secs[0],
                "gbytes_per_s_per_rank": moved / median / 1e9,
                "cpu": vgg16_cpu::tensor::dispatch::cpu_model(),
            })
        );
    }
    Ok(())
}

fn backends(name: &Option<String>) -> Result<Vec<Backend>> {
    match name {
        None => Ok(Backend::available()),
        Some(n) => match Backend::from_name(n) {
            Some(b) if b.supported() => Ok(vec![b]),
            Some(b) => bail!(
                "--backend {}: this CPU cannot run it (no {}; it has: {})",
                b.name(),
                if b == Backend::OwnAvx512 {
                    "AVX-512F"
                } else {
                    "AVX2 + FMA"
                },
                vgg16_cpu::tensor::dispatch::cpu_features()
            ),
            None => {
                let names: Vec<&str> = Backend::ALL.iter().map(|b| b.name()).collect();
                bail!("unknown --backend '{n}' (expected one of: {})", names.join(", "))
            }
        },
    }
}
