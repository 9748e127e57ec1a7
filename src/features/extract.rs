//! `vgg16 extract`: VGG-16 activations of a range of records, streamed in
//! batches into one `.npz` (a float32 NHWC array per requested layer, plus
//! `label` as uint8). Memory stays bounded by the batch: each array streams
//! into its own temporary `.npy`, and the members are copied into the
//! `.npz` (stored, ZIP64) at the end, which is then renamed into place.

use crate::data::Dataset;
use crate::error::{IoContext, Result};
use crate::features::BatchedForward;
use crate::model::vgg::{layer_index, Kind, Vgg16, LAYERS};
use crate::npy::NpyStream;
use crate::observer::Observer;
use crate::tensor::ops::gap_forward;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The name `extract` accepts besides the layer names: GAP of block5_pool.
pub const GAP: &str = "gap";

/// Output shape (H, W, C) of a layer (or "gap": (C)) at input size `size`.
pub fn layer_shape(name: &str, size: usize) -> Option<Vec<usize>> {
    if name == GAP {
        return Some(vec![512]);
    }
    let idx = layer_index(name)?;
    let (mut s, mut c) = (size, 3);
    for l in &LAYERS[..=idx] {
        match l.kind {
            Kind::Conv { cout, .. } => c = cout,
            Kind::Pool => s /= 2,
        }
    }
    Some(vec![s, s, c])
}

/// Checks the requested layer names; returns them in order without repeats.
pub fn parse_layers(list: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name != GAP && layer_index(name).is_none() {
            let known: Vec<&str> = LAYERS.iter().map(|l| l.name).collect();
            crate::config_bail!(
                "unknown layer '{name}' in --layers (known: {}, {GAP})",
                known.join(", ")
            );
        }
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    if out.is_empty() {
        crate::config_bail!("--layers names no layer");
    }
    Ok(out)
}

struct Member {
    name: String,
    path: PathBuf,
    writer: NpyStream<f32, BufWriter<File>>,
}

/// Which records, at what size, in what batches.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub offset: usize,
    pub count: usize,
    pub size: usize,
    pub batch: usize,
}

/// How long an extraction took.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// From preparing the kernels to the last batch's output written.
    pub secs: f64,
    /// Records after the first batch, and their seconds: the steady rate,
    /// without the one-off costs the first batch carries (kernels packed,
    /// every activation buffer fresh pages from the OS). `None` with a
    /// single batch.
    pub after_first: Option<(usize, f64)>,
}

impl Timing {
    /// Records a second after the first batch, when there was more than one.
    pub fn steady_rate(&self) -> Option<f64> {
        self.after_first
            .filter(|&(n, secs)| n > 0 && secs > 0.0)
            .map(|(n, secs)| n as f64 / secs)
    }
}

/// Runs records `offset .. offset+count` of `data` through the base and
/// writes the requested layers to `out`. Returns how long it took.
pub fn extract(
    model: &Vgg16,
    data: &Dataset,
    range: Range,
    layers: &[String],
    out: &Path,
    obs: &mut dyn Observer,
) -> Result<Timing> {
    let Range {
        offset,
        count,
        size,
        batch,
    } = range;
    if offset + count > data.len() {
        crate::config_bail!(
            "records {offset}..{} requested, but the {} split has {}",
            offset + count,
            data.split.name(),
            data.len()
        );
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).at("cannot create", &dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(".extract-")
        .tempdir_in(&dir)
        .at("cannot create a temporary directory in", &dir)?;
    let mut members = Vec::new();
    for name in layers {
        let shape = layer_shape(name, size).expect("validated");
        let mut full = vec![count];
        full.extend(shape);
        let path = tmp.path().join(format!("{name}.npy"));
        let f = File::create(&path).at("cannot create", &path)?;
        let writer = NpyStream::new(BufWriter::with_capacity(1 << 20, f), &full).at("cannot write", &path)?;
        members.push(Member {
            name: name.clone(),
            path,
            writer,
        });
    }
    // Run only as deep as the deepest requested layer.
    let last = layers
        .iter()
        .map(|n| {
            if n == GAP {
                LAYERS.len() - 1
            } else {
                layer_index(n).expect("validated")
            }
        })
        .max()
        .expect("non-empty");
    obs.begin("extract", count as u64, "img");
    let start = std::time::Instant::now();
    let mut labels = Vec::with_capacity(count);
    let mut first_done = None;
    let forward = BatchedForward::new(model, size, batch);
    // Conv outputs not asked for may be fused with the pool after them.
    let keep = |i: usize| layers.iter().any(|n| n.as_str() == LAYERS[i].name);
    forward.run(
        count,
        |r| data.input(&(offset + r.start..offset + r.end).collect::<Vec<_>>(), size),
        0..last + 1,
        &keep,
        |_, i, y| -> Result<()> {
            for m in members.iter_mut() {
                let hit = if m.name == GAP {
                    i == LAYERS.len() - 1
                } else {
                    LAYERS[i].name == m.name
                };
                if !hit {
                    continue;
                }
                let r = if m.name == GAP {
                    m.writer.write(gap_forward(y.view()).as_slice().expect("fresh"))
                } else {
                    m.writer.write(y.as_slice().expect("layer outputs are contiguous"))
                };
                r.at("cannot write activations to", &m.path)?;
            }
            Ok(())
        },
        |r, _| {
            if r.start == 0 {
                first_done = Some((r.end, std::time::Instant::now()));
            }
            labels.extend_from_slice(&data.labels[offset + r.start..offset + r.end]);
            obs.advance(r.len() as u64, "");
            Ok(())
        },
    )?;
    obs.end();
    let timing = Timing {
        secs: start.elapsed().as_secs_f64(),
        after_first: first_done
            .filter(|&(n, _)| n < count)
            .map(|(n, t)| (count - n, t.elapsed().as_secs_f64())),
    };
    // Assemble the .npz: every array, then `label`.
    let label_path = tmp.path().join("label.npy");
    (|| {
        let f = File::create(&label_path)?;
        let mut w = NpyStream::<u8, _>::new(BufWriter::new(f), &[count])?;
        w.write(&labels)?;
        w.finish().map(drop)
    })()
    .at("cannot write", &label_path)?;
    let mut parts: Vec<(String, PathBuf)> = Vec::new();
    for m in members {
        m.writer.finish().at("cannot write", &m.path)?;
        parts.push((m.name, m.path));
    }
    parts.push(("label".to_string(), label_path));
    crate::atomic_write(out, |f| {
        let mut zip = zip::ZipWriter::new(BufWriter::new(f));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        let mut copy = || -> std::io::Result<()> {
            for (name, path) in &parts {
                zip.start_file(format!("{name}.npy"), opts)
                    .map_err(std::io::Error::other)?;
                let mut src = File::open(path)?;
                std::io::copy(&mut src, &mut zip)?;
            }
            Ok(())
        };
        if let Err(e) = copy() {
            // Abandon the half-written file quietly (the zip writer's drop
            // would try to finish it and print to stderr).
            std::mem::forget(zip);
            return Err(e);
        }
        let mut inner = zip.finish().map_err(std::io::Error::other)?;
        inner.flush()
    })
    .at("cannot write", out)?;
    Ok(timing)
}
