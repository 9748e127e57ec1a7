//! `vgg16 predict`: top-k classes of image files and folders.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use vgg16_cpu::model::saved::SavedModel;
use vgg16_cpu::PredictJob;

#[derive(Args)]
pub struct PredictArgs {
    /// A model.npz, or a run directory (meaning its model.npz).
    #[arg(long)]
    model: PathBuf,
    /// Image files (JPEG, PNG, BMP, WebP, GIF) or folders (walked
    /// recursively; hidden files and non-images skipped).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// One JSON object per image, one a line.
    #[arg(long)]
    json: bool,
    /// Also write a CSV: path, then class_1, probability_1, ... class_k,
    /// probability_k, then error (empty when the image was read).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Images per forward batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn predict(args: &PredictArgs) -> Result<()> {
    let model = SavedModel::load(&args.model)?;
    let (images, others) = vgg16_cpu::data::folder::image_files(&args.images)?;
    if others > 0 {
        eprintln!("predict: skipped {others} non-image file(s) in the folders given");
    }
    if images.is_empty() {
        bail!(
            "no images found in {}",
            args.images
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let k = args.top_k.clamp(1, model.meta.class_names.len());
    // The CSV goes to a temporary file, renamed when every row is written.
    let mut csv = match &args.csv {
        Some(path) => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let tmp = tempfile::NamedTempFile::new_in(&dir)
                .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
            let mut w = csv::Writer::from_writer(std::io::BufWriter::new(tmp));
            let mut header = vec!["path".to_string()];
            for i in 1..=k {
                header.push(format!("class_{i}"));
                header.push(format!("probability_{i}"));
            }
            header.push("error".into());
            w.write_record(&header)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Some((path, w))
        }
        None => None,
    };
    let mut csv_err = None;
    let job = PredictJob {
        model: &model,
        images: &images,
        top_k: k,
        batch_size: args.batch_size.max(1),
    };
    let failed = job.run(|path, answer| {
        if let Some((_, w)) = csv.as_mut() {
            let mut row = vec![path.display().to_string()];
            match &answer {
                Ok(top) => {
                    for (n, q) in top {
                        row.push(n.clone());
                        row.push(format!("{q:.6}"));
                    }
                    row.push(String::new());
                }
                Err(e) => {
                    row.extend(std::iter::repeat_n(String::new(), 2 * k));
                    row.push(vgg16_cpu::error::chain(e));
                }
            }
            if let Err(e) = w.write_record(&row) {
                csv_err.get_or_insert(e);
            }
        }
        match answer {
            Err(e) => eprintln!("error: {}", vgg16_cpu::error::chain(&e)),
            Ok(top) if args.json => {
                let t: Vec<_> = top.iter().map(|(n, q)| json!({"class": n, "probability": q})).collect();
                println!("{}", json!({"file": path, "top": t}));
            }
            Ok(top) => {
                let t: Vec<String> = top.iter().map(|(n, q)| format!("{n} {:.1}%", 100.0 * q)).collect();
                println!("{}: {}", path.display(), t.join(", "));
            }
        }
    });
    if let Some((path, w)) = csv {
        if let Some(e) = csv_err {
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        let tmp = w
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|b| b.into_inner().map_err(|e| e.into_error()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        tmp.persist(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("predict: {} rows -> {}", images.len(), path.display());
    }
    if failed > 0 {
        bail!("{failed} of {} images could not be read", images.len());
    }
    Ok(())
}
