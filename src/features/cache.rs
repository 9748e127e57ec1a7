//! The activation cache: blocks 1-4 of VGG-16 are frozen, so each image's
//! `block4_pool` (N, S/16, S/16, 512) and its stage-1 feature (GAP of
//! `block5_pool` with the pretrained block5, (N, 512)) are computed once, in
//! one pass, and kept on disk as `.npy` files:
//!
//! ```text
//! <cache-dir>/<split>-<S>px-n<N>-<id>/
//!     meta.json         key, progress, per-chunk SHA-256, complete flag
//!     block4_pool.npy   f32 (or f16 with --cache-dtype f16), memory-mapped
//!     gap.npy           f32
//!     label.npy         u8
//! ```
//!
//! The key (format version, base-weights digest, image size, preprocessing,
//! the split's content digest, record count, dtype) names the directory, so
//! a cache is only ever used for exactly what it was built from. It is
//! written in chunks; a chunk counts as done only after its bytes are synced
//! and `meta.json` (rewritten atomically) records it, so an interrupted pass
//! resumes at the first unfinished chunk. On open, sizes, headers and chunk
//! digests are checked; a damaged cache is reported, removed and rebuilt.

use crate::data::image::PREPROCESSING;
use crate::data::Dataset;
use crate::error::{Error, IoContext, Result};
use crate::features::BatchedForward;
use crate::model::vgg::{layer_index, Vgg16, LAYERS};
use crate::npy::{header, NpyElem};
use crate::observer::Observer;
use crate::tensor::ops::gap_forward;
use half::f16;
use ndarray::{Array2, Array4};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bumped whenever the layout or the meaning of cached values changes.
pub const FORMAT_VERSION: u32 = 1;
/// Records per durable chunk.
pub const CHUNK: usize = 256;
/// Caches up to this size have every chunk digest checked on open; larger
/// ones a sample (first, last and a few in between).
const FULL_VERIFY_BYTES: u64 = 4 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
    pub fn parse(s: &str) -> Option<Dtype> {
        match s {
            "f32" => Some(Dtype::F32),
            "f16" => Some(Dtype::F16),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    pub format_version: u32,
    pub weights_digest: String,
    pub image_size: usize,
    pub preprocessing: String,
    /// The split's identity ([`Dataset::digest`]): for CIFAR, SHA-256 over
    /// its labels and image bytes in record order; for a folder, over the
    /// file listing, class names and resize policy.
    pub dataset_digest: String,
    /// How images reach S for a folder ("stretch", "center-crop"); absent
    /// for CIFAR (so CIFAR keys are those of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<String>,
    /// "hflip" for the mirrored augmentation view; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
    pub split: String,
    /// Records 0..records of the split.
    pub records: usize,
    pub dtype: Dtype,
}

impl CacheKey {
    pub fn new(weights_digest: &str, image_size: usize, data: &Dataset, records: usize, dtype: Dtype) -> CacheKey {
        CacheKey {
            format_version: FORMAT_VERSION,
            weights_digest: weights_digest.to_string(),
            image_size,
            preprocessing: PREPROCESSING.to_string(),
            dataset_digest: data.digest(),
            resize: match data.resize() {
                crate::data::Resize::Cifar32 => None,
                r => Some(r.name().to_string()),
            },
            view: data.flip.then(|| "hflip".to_string()),
            split: data.split.name().to_string(),
            records,
            dtype,
        }
    }

    /// 16 hex digits of SHA-256 over the key's JSON.
    pub fn id(&self) -> String {
        let json = serde_json::to_string(self).expect("plain data");
        crate::data::fetch::hex(&Sha256::digest(json.as_bytes()))[..16].to_string()
    }

    pub fn dir_name(&self) -> String {
        let view = self.view.as_ref().map_or(String::new(), |v| format!("-{v}"));
        format!(
            "{}{view}-{}px-n{}-{}",
            self.split,
            self.image_size,
            self.records,
            self.id()
        )
    }

    /// Spatial side of block4_pool.
    pub fn side(&self) -> usize {
        self.image_size / 16
    }

    pub fn block4_shape(&self) -> [usize; 4] {
        [self.records, self.side(), self.side(), 512]
    }

    pub fn bytes_per_record(&self) -> usize {
        self.side() * self.side() * 512 * self.dtype.bytes() + 512 * 4 + 1
    }
}

/// The split's identity, [`Dataset::digest`].
pub fn dataset_digest(data: &Dataset) -> String {
    data.digest()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub key: CacheKey,
    pub chunk: usize,
    /// Records written and synced.
    pub done: usize,
    /// SHA-256 of each finished chunk's block4 bytes.
    pub chunk_digests: Vec<String>,
    pub complete: bool,
    pub build_seconds: f64,
    /// SHA-256 of gap.npy and label.npy, whole files, set when complete
    /// (empty in caches from before they were recorded: those rebuild).
    #[serde(default)]
    pub gap_digest: String,
    #[serde(default)]
    pub label_digest: String,
}

/// An opened, complete cache.
pub struct Cache {
    pub dir: PathBuf,
    pub meta: Meta,
    block4: memmap2::Mmap,
    block4_offset: usize,
    pub gap: Array2<f32>,
    pub labels: Vec<u8>,
}

fn files(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    (
        dir.join("meta.json"),
        dir.join("block4_pool.npy"),
        dir.join("gap.npy"),
        dir.join("label.npy"),
    )
}

fn header_for(key: &CacheKey) -> Vec<u8> {
    match key.dtype {
        Dtype::F32 => header::<f32>(&key.block4_shape()),
        Dtype::F16 => header::<f16>(&key.block4_shape()),
    }
}

fn read_meta(path: &Path) -> Result<Meta> {
    let text = std::fs::read_to_string(path).at("cannot read", path)?;
    serde_json::from_str(&text).map_err(|e| Error::invalid(path, format!("not a cache metadata file ({e})")))
}

fn write_meta(path: &Path, meta: &Meta) -> Result<()> {
    let json = serde_json::to_vec_pretty(meta).expect("plain data");
    crate::atomic_write(path, |f| std::io::Write::write_all(f, &json)).at("cannot write", path)
}

/// What [`open_or_build`] did, for the caller to report.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A complete cache with this key existed; no pass ran.
    Hit,
    /// Built (or finished building) now, in `seconds`, from `resumed_at`.
    Built { seconds: f64, resumed_at: usize },
}

/// Free bytes on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a writable statvfs.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (r == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// SHA-256 of a whole file, as hex.
fn file_digest(p: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut f = File::open(p).at("cannot open", p)?;
    std::io::copy(&mut f, &mut h).at("cannot read", p)?;
    Ok(crate::data::fetch::hex(&h.finalize()))
}

/// Holds an exclusive lock on one cache key while it is found or built:
/// two runs wanting the same cache do the work once (the second waits,
/// then finds it complete). Released on drop.
struct BuildLock {
    _file: File,
}

impl BuildLock {
    fn take(cache_dir: &Path, key: &CacheKey, obs: &mut dyn Observer) -> Result<BuildLock> {
        use std::os::fd::AsRawFd;
        let p = cache_dir.join(format!(".{}.lock", key.dir_name()));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .at("cannot create the lock file", &p)?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            obs.info(&format!(
                "cache: another process is building {}; waiting for it",
                cache_dir.join(key.dir_name()).display()
            ));
            // SAFETY: as above.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(std::io::Error::last_os_error()).at("cannot lock", &p);
            }
        }
        Ok(BuildLock { _file: f })
    }
}

/// Looks for a complete cache serving records 0..key.records: the exact
/// key, or the same key over more records (a whole split serves any
/// prefix).
pub fn find(cache_dir: &Path, key: &CacheKey) -> Option<PathBuf> {
    let exact = cache_dir.join(key.dir_name());
    if exact.join("meta.json").is_file() {
        return Some(exact);
    }
    let entries = std::fs::read_dir(cache_dir).ok()?;
    let mut best: Option<(usize, PathBuf)> = None;
    for e in entries.flatten() {
        let Ok(meta) = read_meta(&e.path().join("meta.json")) else {
            continue;
        };
        let mut k = meta.key.clone();
        k.records = key.records;
        if meta.complete
            && k == *key
            && meta.key.records > key.records
            && best.as_ref().is_none_or(|(n, _)| meta.key.records < *n)
        {
            best = Some((meta.key.records, e.path()));
        }
    }
    best.map(|(_, p)| p)
}

/// Opens the cache for `key` (or a larger one that serves it), building or
/// resuming it first when needed. `data` must be the split the key names.
pub fn open_or_build(
    cache_dir: &Path,
    key: &CacheKey,
    model: &Vgg16,
    data: &Dataset,
    batch: usize,
    obs: &mut dyn Observer,
) -> Result<(Cache, Outcome)> {
    std::fs::create_dir_all(cache_dir).at("cannot create cache directory", cache_dir)?;
    let _lock = BuildLock::take(cache_dir, key, obs)?;
    if let Some(dir) = find(cache_dir, key) {
        match open(&dir, key, data) {
            Ok(Some(c)) => {
                obs.info(&format!(
                    "cache: using {} ({} records, built in {:.0} s): blocks 1-4 will not run",
                    dir.display(),
                    c.meta.key.records,
                    c.meta.build_seconds
                ));
                return Ok((c, Outcome::Hit));
            }
            Ok(None) => {} // incomplete: resume below
            Err(e) => {
                obs.info(&format!(
                    "cache: {} is damaged ({}); removing it and rebuilding",
                    dir.display(),
                    crate::error::chain(&e)
                ));
                std::fs::remove_dir_all(&dir).at("cannot remove", &dir)?;
            }
        }
    }
    let dir = cache_dir.join(key.dir_name());
    let seconds = build(&dir, key, model, data, batch, obs)?;
    let resumed_at = seconds.1;
    let c = open(&dir, key, data)?.ok_or_else(|| Error::invalid(&dir, "cache incomplete right after building it"))?;
    Ok((
        c,
        Outcome::Built {
            seconds: seconds.0,
            resumed_at,
        },
    ))
}

/// Builds (or resumes) the cache in `dir`. Returns (seconds, resumed_at).
fn build(
    dir: &Path,
    key: &CacheKey,
    model: &Vgg16,
    data: &Dataset,
    batch: usize,
    obs: &mut dyn Observer,
) -> Result<(f64, usize)> {
    let (meta_p, b4_p, gap_p, lab_p) = files(dir);
    let n = key.records;
    if n > data.len() {
        crate::config_bail!(
            "cache for {n} records requested, but the {} split has {}",
            data.split.name(),
            data.len()
        );
    }
    let mut meta = match read_meta(&meta_p) {
        Ok(m) if m.key == *key && !m.complete && m.chunk == CHUNK && m.chunk_digests.len() * CHUNK >= m.done.min(n) => {
            m
        }
        _ => Meta {
            key: key.clone(),
            chunk: CHUNK,
            done: 0,
            chunk_digests: vec![],
            complete: false,
            build_seconds: 0.0,
            gap_digest: String::new(),
            label_digest: String::new(),
        },
    };
    std::fs::create_dir_all(dir).at("cannot create", dir)?;
    let side = key.side();
    let rec_b4 = side * side * 512;
    let b4_header = header_for(key);
    let gap_header = header::<f32>(&[n, 512]);
    let lab_header = header::<u8>(&[n]);
    let b4_total = (b4_header.len() + n * rec_b4 * key.dtype.bytes()) as u64;
    let total_bytes = b4_total + (gap_header.len() + n * 2048) as u64 + (lab_header.len() + n) as u64;

    let resumed_at = meta.done;
    let remaining = n - meta.done;
    let need = total_bytes.saturating_sub(std::fs::metadata(&b4_p).map(|m| m.len()).unwrap_or(0));
    let free = free_bytes(dir);
    let gflop = 30.7 * (key.image_size as f64 / 224.0).powi(2) * remaining as f64;
    obs.info(&format!(
        "cache: building {} ({} {} records at {}x{}{}): {:.2} GB on disk, {} free; {:.1} TFLOP, time estimated after the first batch",
        dir.display(),
        remaining,
        key.split,
        key.image_size,
        key.image_size,
        if resumed_at > 0 {
            format!(", resuming at record {resumed_at}")
        } else {
            String::new()
        },
        total_bytes as f64 / 1e9,
        free.map_or("unknown".into(), |f| format!("{:.2} GB", f as f64 / 1e9)),
        gflop / 1000.0
    ));
    if let Some(f) = free {
        if need > f {
            crate::config_bail!(
                "not enough disk space for the cache in {}: it needs {} more, {} are free (use --cache-dir elsewhere, --cache-dtype f16, or a smaller --limit-train)",
                dir.display(),
                human_bytes(need - f),
                human_bytes(f)
            );
        }
    }
    let open_rw = |p: &Path, header: &[u8], len: u64| -> Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .at("cannot open", p)?;
        f.set_len(len).at("cannot size", p)?;
        f.write_all_at(header, 0).at("cannot write", p)?;
        Ok(f)
    };
    let b4 = open_rw(&b4_p, &b4_header, b4_total)?;
    let gap = open_rw(&gap_p, &gap_header, (gap_header.len() + n * 2048) as u64)?;
    let lab = open_rw(&lab_p, &lab_header, (lab_header.len() + n) as u64)?;

    let b4_idx = layer_index("block4_pool").expect("known layer");
    obs.begin("cache", remaining as u64, "img");
    let start = std::time::Instant::now();
    let mut bytes = Vec::new();
    let forward = BatchedForward::new(model, key.image_size, batch);
    while meta.done < n {
        let c0 = meta.done;
        let c1 = (c0 + CHUNK).min(n);
        let mut chunk_hash = Sha256::new();
        forward.run(
            c1 - c0,
            |r| data.input(&(c0 + r.start..c0 + r.end).collect::<Vec<_>>(), key.image_size),
            0..LAYERS.len(),
            |r, i, a| -> Result<()> {
                if i != b4_idx {
                    return Ok(());
                }
                // block4_pool of records c0+r, in place in the file.
                bytes.clear();
                let flat = a.as_slice().expect("contiguous");
                match key.dtype {
                    Dtype::F32 => f32::extend_le(flat, &mut bytes),
                    Dtype::F16 => {
                        let h: Vec<f16> = flat.iter().map(|&v| f16::from_f32(v)).collect();
                        f16::extend_le(&h, &mut bytes)
                    }
                }
                chunk_hash.update(&bytes);
                let s = c0 + r.start;
                b4.write_all_at(&bytes, (b4_header.len() + s * rec_b4 * key.dtype.bytes()) as u64)
                    .at("cannot write", &b4_p)
            },
            |r, y| -> Result<()> {
                let (s, e) = (c0 + r.start, c0 + r.end);
                let g = gap_forward(y.view());
                let mut gb = Vec::with_capacity(g.len() * 4);
                f32::extend_le(g.as_slice().expect("contiguous"), &mut gb);
                gap.write_all_at(&gb, (gap_header.len() + s * 2048) as u64)
                    .at("cannot write", &gap_p)?;
                lab.write_all_at(&data.labels[s..e], (lab_header.len() + s) as u64)
                    .at("cannot write", &lab_p)?;
                obs.advance((e - s) as u64, "");
                if s == resumed_at {
                    // The estimate comes from this CPU and these kernels, measured
                    // on the first batch (which also prepares the kernels, so it
                    // errs long).
                    let per = start.elapsed().as_secs_f64() / (e - s) as f64;
                    obs.info(&format!(
                        "cache: first batch of {} at {:.1} img/s: about {} for the {} records",
                        e - s,
                        1.0 / per,
                        human_secs(per * remaining as f64),
                        remaining
                    ));
                }
                Ok(())
            },
        )?;
        for (f, p) in [(&b4, &b4_p), (&gap, &gap_p), (&lab, &lab_p)] {
            f.sync_data().at("cannot sync", p)?;
        }
        meta.chunk_digests.truncate(c0 / CHUNK);
        meta.chunk_digests.push(crate::data::fetch::hex(&chunk_hash.finalize()));
        meta.done = c1;
        write_meta(&meta_p, &meta)?;
    }
    obs.end();
    let secs = start.elapsed().as_secs_f64();
    meta.gap_digest = file_digest(&gap_p)?;
    meta.label_digest = file_digest(&lab_p)?;
    meta.complete = true;
    meta.build_seconds += secs;
    write_meta(&meta_p, &meta)?;
    Ok((secs, resumed_at))
}

/// Bytes as a person reads them: "512 B", "3.4 MB", "1.25 GB".
pub fn human_bytes(b: u64) -> String {
    match b {
        0..1_000 => format!("{b} B"),
        1_000..1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        _ => format!("{:.2} GB", b as f64 / 1e9),
    }
}

fn human_secs(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// Opens a cache directory. Ok(None): a valid but incomplete cache (resume
/// it); Err: damaged or not matching `data`.
pub fn open(dir: &Path, want: &CacheKey, data: &Dataset) -> Result<Option<Cache>> {
    let (meta_p, b4_p, gap_p, lab_p) = files(dir);
    let mut meta = read_meta(&meta_p)?;
    // The key inside, not the directory's name, says what a cache holds (a
    // cache copied or renamed under another name is refused here).
    let mut k = meta.key.clone();
    k.records = want.records;
    if k != *want || meta.key.records < want.records {
        return Err(Error::invalid(
            &meta_p,
            format!(
                "holds the cache {} ({} records), not the one asked for, {} ({} records)",
                meta.key.dir_name(),
                meta.key.records,
                want.dir_name(),
                want.records
            ),
        ));
    }
    if !meta.complete {
        return Ok(None);
    }
    let key = &meta.key;
    let n = key.records;
    if key.format_version != FORMAT_VERSION {
        return Err(Error::invalid(
            &meta_p,
            format!(
                "format version {} (this program writes {FORMAT_VERSION})",
                key.format_version
            ),
        ));
    }
    // Bounds before any size arithmetic: our chunk size, no more records
    // than the split has.
    if meta.chunk != CHUNK || n > data.len() || meta.done != n {
        return Err(Error::invalid(
            &meta_p,
            format!(
                "chunk {} (expected {CHUNK}), {} of {n} records done, for a split of {}",
                meta.chunk,
                meta.done,
                data.len()
            ),
        ));
    }
    if meta.chunk_digests.len() != n.div_ceil(meta.chunk.max(1)) {
        return Err(Error::invalid(
            &meta_p,
            format!("{} chunk digests for {n} records", meta.chunk_digests.len()),
        ));
    }
    let b4_header = header_for(key);
    let rec_bytes = key.side() * key.side() * 512 * key.dtype.bytes();
    let f = File::open(&b4_p).at("cannot open", &b4_p)?;
    let want = (b4_header.len() + n * rec_bytes) as u64;
    let len = f.metadata().at("cannot read", &b4_p)?.len();
    if len != want {
        return Err(Error::invalid(
            &b4_p,
            format!("{len} bytes, expected {want} (truncated?)"),
        ));
    }
    // SAFETY: the file is only read through this map; the cache directory
    // belongs to this program, which never writes a complete cache again.
    let map = unsafe { memmap2::Mmap::map(&f) }.at("cannot map", &b4_p)?;
    if map[..b4_header.len()] != b4_header[..] {
        return Err(Error::invalid(&b4_p, "unexpected .npy header"));
    }
    // Chunk digests: all of them, or a sample for very large caches.
    let chunks = meta.chunk_digests.len();
    let check: Vec<usize> = if want <= FULL_VERIFY_BYTES {
        (0..chunks).collect()
    } else {
        let mut v: Vec<usize> = (0..8).map(|i| i * chunks / 8).collect();
        v.push(chunks - 1);
        v.dedup();
        v
    };
    for c in check {
        let r0 = c * meta.chunk;
        let r1 = (r0 + meta.chunk).min(n);
        let bytes = &map[b4_header.len() + r0 * rec_bytes..b4_header.len() + r1 * rec_bytes];
        if crate::data::fetch::hex(&Sha256::digest(bytes)) != meta.chunk_digests[c] {
            return Err(Error::invalid(
                &b4_p,
                format!("records {r0}..{r1} do not match their recorded digest"),
            ));
        }
    }
    if meta.gap_digest.is_empty() && meta.label_digest.is_empty() {
        // A cache built before these digests were recorded: record them now
        // (trust on first use; block4 was verified above), so any later
        // change is caught.
        meta.gap_digest = file_digest(&gap_p)?;
        meta.label_digest = file_digest(&lab_p)?;
        write_meta(&meta_p, &meta)?;
    }
    for (p, want) in [(&gap_p, &meta.gap_digest), (&lab_p, &meta.label_digest)] {
        if file_digest(p)? != *want {
            return Err(Error::invalid(
                p,
                "does not match the digest recorded when the cache was built",
            ));
        }
    }
    let gap: Array2<f32> =
        ndarray_npy::read_npy(&gap_p).map_err(|e| Error::invalid(&gap_p, format!("cannot read ({e})")))?;
    if gap.dim() != (n, 512) || gap.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            &gap_p,
            format!("shape {:?} or values are wrong", gap.dim()),
        ));
    }
    let labels: ndarray::Array1<u8> =
        ndarray_npy::read_npy(&lab_p).map_err(|e| Error::invalid(&lab_p, format!("cannot read ({e})")))?;
    if labels.len() != n || data.len() < n || labels.as_slice().expect("fresh") != &data.labels[..n] {
        return Err(Error::invalid(&lab_p, "labels do not match the dataset"));
    }
    Ok(Some(Cache {
        dir: dir.to_path_buf(),
        block4_offset: b4_header.len(),
        block4: map,
        gap,
        labels: labels.to_vec(),
        meta,
    }))
}

impl Cache {
    /// block4_pool of the given records, gathered into one batch
    /// (B, S/16, S/16, 512), converted to f32.
    pub fn block4(&self, idx: &[usize]) -> Array4<f32> {
        let side = self.meta.key.side();
        let per = side * side * 512;
        let mut out = Array4::<f32>::zeros((idx.len(), side, side, 512));
        let dst = out.as_slice_mut().expect("fresh");
        let eb = self.meta.key.dtype.bytes();
        let dtype = self.meta.key.dtype;
        let map = &self.block4[..];
        let off = self.block4_offset;
        dst.par_chunks_mut(per).zip(idx.par_iter()).for_each(|(d, &i)| {
            let src = &map[off + i * per * eb..off + (i + 1) * per * eb];
            match dtype {
                Dtype::F32 => {
                    for (o, b) in d.iter_mut().zip(src.chunks_exact(4)) {
                        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
                Dtype::F16 => {
                    for (o, b) in d.iter_mut().zip(src.chunks_exact(2)) {
                        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
            }
        });
        out
    }

    /// Stage-1 features of the given records (B, 512).
    pub fn gap_rows(&self, idx: &[usize]) -> Array2<f32> {
        Array2::from_shape_fn((idx.len(), 512), |(j, c)| self.gap[[idx[j], c]])
    }

    pub fn len(&self) -> usize {
        self.meta.key.records
    }

    pub fn is_empty(&self) -> bool {
        self.meta.key.records == 0
    }
}

/// Removes the caches in `cache_dir` named in `names` (a directory name,
/// or the id at its end), or every one with `all`. A directory that is not
/// provably a cache is never removed: named, it is an error; under `all`,
/// it is skipped and reported.
pub fn remove(cache_dir: &Path, all: bool, names: &[String]) -> Result<Removed> {
    if !all && names.is_empty() {
        crate::config_bail!("name the caches to remove (see `vgg16 cache ls`), or pass --all");
    }
    let mut out = Removed::default();
    let mut matched = false;
    for (p, meta, bytes) in list(cache_dir)? {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !(all || names.iter().any(|n| name == *n || name.ends_with(&format!("-{n}")))) {
            continue;
        }
        matched = true;
        // Only a directory proven to be one of ours: a readable meta.json of
        // this format whose key names this very directory.
        let ours = meta.is_some_and(|m| m.key.dir_name() == name);
        if !ours {
            if !all {
                crate::config_bail!(
                    "{}: not a vgg16 cache (no valid meta.json naming it); not removed",
                    p.display()
                );
            }
            out.skipped.push(name);
            continue;
        }
        std::fs::remove_dir_all(&p).at("cannot remove", &p)?;
        out.removed.push((name, bytes));
    }
    if !matched {
        crate::config_bail!("no cache in {} matches {:?}", cache_dir.display(), names);
    }
    Ok(out)
}

/// What [`remove`] did: each removed cache (name, bytes), and the
/// directories `--all` left alone because they are not caches.
#[derive(Debug, Default)]
pub struct Removed {
    pub removed: Vec<(String, u64)>,
    pub skipped: Vec<String>,
}

/// One line per cache directory: for `vgg16 cache ls`.
pub fn list(cache_dir: &Path) -> Result<Vec<(PathBuf, Option<Meta>, u64)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        let size: u64 = std::fs::read_dir(&p)
            .map(|d| d.flatten().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        out.push((p.clone(), read_meta(&p.join("meta.json")).ok(), size));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
