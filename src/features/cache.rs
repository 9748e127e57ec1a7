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

/// Opens the lock file `p` and tries an exclusive lock on it without
/// waiting: (file, whether the lock was taken).
fn try_lock(p: &Path) -> Result<(File, bool)> {
    use std::os::fd::AsRawFd;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .at("cannot create the lock file", p)?;
    // SAFETY: flock on a file descriptor this function owns.
    let taken = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    Ok((f, taken))
}

impl BuildLock {
    fn take(cache_dir: &Path, key: &CacheKey, obs: &mut dyn Observer) -> Result<BuildLock> {
        use std::os::fd::AsRawFd;
        let p = cache_dir.join(format!(".{}.lock", key.dir_name()));
        let (f, taken) = try_lock(&p)?;
        if !taken {
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

/// The three files of a cache being written, sized and headed, and the
/// network that fills them one chunk at a time. Chunks are the unit of
/// work for a serial build and for shards alike: a chunk's records always
/// run in the same batches, so its bytes do not depend on who wrote it.
struct Writer<'a> {
    key: &'a CacheKey,
    data: &'a Dataset,
    forward: BatchedForward<'a>,
    files: [(File, PathBuf); 3],
    b4_header: usize,
    gap_header: usize,
    lab_header: usize,
}

impl<'a> Writer<'a> {
    /// Opens (creating and sizing) the files in `dir`; they may already
    /// hold chunks written by an earlier pass or by other shards.
    fn open(dir: &Path, key: &'a CacheKey, model: &'a Vgg16, data: &'a Dataset, batch: usize) -> Result<Writer<'a>> {
        let (_, b4_p, gap_p, lab_p) = files(dir);
        let n = key.records;
        std::fs::create_dir_all(dir).at("cannot create", dir)?;
        let b4_header = header_for(key);
        let gap_header = header::<f32>(&[n, 512]);
        let lab_header = header::<u8>(&[n]);
        let rec_b4 = key.side() * key.side() * 512 * key.dtype.bytes();
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
        let b4 = open_rw(&b4_p, &b4_header, (b4_header.len() + n * rec_b4) as u64)?;
        let gap = open_rw(&gap_p, &gap_header, (gap_header.len() + n * 2048) as u64)?;
        let lab = open_rw(&lab_p, &lab_header, (lab_header.len() + n) as u64)?;
        Ok(Writer {
            key,
            data,
            forward: BatchedForward::new(model, key.image_size, batch),
            files: [(b4, b4_p), (gap, gap_p), (lab, lab_p)],
            b4_header: b4_header.len(),
            gap_header: gap_header.len(),
            lab_header: lab_header.len(),
        })
    }

    /// Computes records `c0..c1` (one chunk) into the files, syncs them,
    /// and returns the SHA-256 of the chunk's block4 bytes. `done(r)` is
    /// called after each batch with the records it finished.
    fn chunk(&self, c0: usize, c1: usize, done: &mut dyn FnMut(usize, usize)) -> Result<String> {
        let key = self.key;
        let rec_b4 = key.side() * key.side() * 512;
        let b4_idx = layer_index("block4_pool").expect("known layer");
        let [(b4, b4_p), (gap, gap_p), (lab, lab_p)] = &self.files;
        let mut chunk_hash = Sha256::new();
        let mut bytes = Vec::new();
        self.forward.run(
            c1 - c0,
            |r| {
                self.data
                    .input(&(c0 + r.start..c0 + r.end).collect::<Vec<_>>(), key.image_size)
            },
            0..LAYERS.len(),
            &|_| false,
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
                b4.write_all_at(&bytes, (self.b4_header + s * rec_b4 * key.dtype.bytes()) as u64)
                    .at("cannot write", b4_p)
            },
            |r, y| -> Result<()> {
                let (s, e) = (c0 + r.start, c0 + r.end);
                let g = gap_forward(y.view());
                let mut gb = Vec::with_capacity(g.len() * 4);
                f32::extend_le(g.as_slice().expect("contiguous"), &mut gb);
                gap.write_all_at(&gb, (self.gap_header + s * 2048) as u64)
                    .at("cannot write", gap_p)?;
                lab.write_all_at(&self.data.labels[s..e], (self.lab_header + s) as u64)
                    .at("cannot write", lab_p)?;
                done(s, e);
                Ok(())
            },
        )?;
        for (f, p) in &self.files {
            f.sync_data().at("cannot sync", p)?;
        }
        Ok(crate::data::fetch::hex(&chunk_hash.finalize()))
    }
}

/// Checks the request against the split and the disk, and says what is
/// about to be built. Returns the bytes the finished cache takes.
fn announce(
    dir: &Path,
    key: &CacheKey,
    data: &Dataset,
    remaining: usize,
    note: &str,
    obs: &mut dyn Observer,
) -> Result<()> {
    let (_, b4_p, _, _) = files(dir);
    let n = key.records;
    if n > data.len() {
        crate::config_bail!(
            "cache for {n} records requested, but the {} split has {}",
            data.split.name(),
            data.len()
        );
    }
    let total_bytes = (header_for(key).len() + n * key.side() * key.side() * 512 * key.dtype.bytes()) as u64
        + (header::<f32>(&[n, 512]).len() + n * 2048) as u64
        + (header::<u8>(&[n]).len() + n) as u64;
    let need = total_bytes.saturating_sub(std::fs::metadata(&b4_p).map(|m| m.len()).unwrap_or(0));
    let free = free_bytes(dir.parent().unwrap_or(dir));
    let gflop = 30.7 * (key.image_size as f64 / 224.0).powi(2) * remaining as f64;
    obs.info(&format!(
        "cache: building {} ({} {} records at {}x{}{note}): {:.2} GB on disk, {} free; {:.1} TFLOP, time estimated after the first batch",
        dir.display(),
        remaining,
        key.split,
        key.image_size,
        key.image_size,
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
    Ok(())
}

/// The progress callback of a build: advances the bar and, after the
/// first batch, prints the time estimate measured on this CPU.
fn progress<'o>(
    obs: &'o mut dyn Observer,
    remaining: usize,
    start: std::time::Instant,
) -> impl FnMut(usize, usize) + 'o {
    let mut first = true;
    move |s, e| {
        obs.advance((e - s) as u64, "");
        if first {
            first = false;
            // Measured on the first batch (which also prepares the kernels,
            // so it errs long).
            let per = start.elapsed().as_secs_f64() / (e - s) as f64;
            obs.info(&format!(
                "cache: first batch of {} at {:.1} img/s: about {} for the {} records",
                e - s,
                1.0 / per,
                human_secs(per * remaining as f64),
                remaining
            ));
        }
    }
}

/// Builds (or resumes) the cache in `dir`. Returns (seconds, resumed_at).
/// Chunks that shards ([`build_shard`]) already finished are taken as
/// they are (their digests are checked when the cache is opened).
fn build(
    dir: &Path,
    key: &CacheKey,
    model: &Vgg16,
    data: &Dataset,
    batch: usize,
    obs: &mut dyn Observer,
) -> Result<(f64, usize)> {
    let (meta_p, _, gap_p, lab_p) = files(dir);
    let n = key.records;
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
    let by_shards = shard_digests(dir, key);
    let resumed_at = meta.done;
    let remaining = (meta.done / CHUNK..n.div_ceil(CHUNK))
        .filter(|c| !by_shards.contains_key(c))
        .map(|c| (c * CHUNK + CHUNK).min(n) - (c * CHUNK).max(meta.done))
        .sum::<usize>();
    let note = if resumed_at > 0 || !by_shards.is_empty() {
        format!(
            ", resuming at record {resumed_at}{}",
            if by_shards.is_empty() {
                String::new()
            } else {
                format!(", {} chunks done by shards", by_shards.len())
            }
        )
    } else {
        String::new()
    };
    announce(dir, key, data, remaining, &note, obs)?;
    let w = Writer::open(dir, key, model, data, batch)?;
    obs.begin("cache", remaining as u64, "img");
    let start = std::time::Instant::now();
    {
        let mut done = progress(obs, remaining, start);
        while meta.done < n {
            let c0 = meta.done;
            let c1 = (c0 + CHUNK).min(n);
            let digest = match by_shards.get(&(c0 / CHUNK)) {
                Some(d) if c0 % CHUNK == 0 => d.clone(),
                _ => w.chunk(c0, c1, &mut done)?,
            };
            meta.chunk_digests.truncate(c0 / CHUNK);
            meta.chunk_digests.push(digest);
            meta.done = c1;
            write_meta(&meta_p, &meta)?;
        }
    }
    obs.end();
    let secs = start.elapsed().as_secs_f64();
    meta.gap_digest = file_digest(&gap_p)?;
    meta.label_digest = file_digest(&lab_p)?;
    meta.complete = true;
    meta.build_seconds += secs;
    write_meta(&meta_p, &meta)?;
    remove_shard_progress(dir);
    Ok((secs, resumed_at))
}

/// One process's share of a cache build: chunk `c` belongs to shard
/// `c % count`, so shards never write the same bytes and any number of
/// them can run at once, on one machine or many sharing `--cache-dir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// "i/n", 0 <= i < n (Slurm's `--array=0-(n-1)` gives i).
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || Error::Config(format!("--shard '{s}': expected i/n with 0 <= i < n, e.g. 0/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    pub fn owns(&self, chunk: usize) -> bool {
        chunk % self.count == self.index
    }

    fn file_name(&self) -> String {
        format!("{}-of-{}.json", self.index, self.count)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What one shard has finished: written to `<cache>/shards/i-of-n.json`
/// (atomically, after the chunk's bytes are synced) after every chunk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardProgress {
    pub key: CacheKey,
    pub chunk: usize,
    pub shard: Shard,
    /// Chunk index -> SHA-256 of its block4 bytes.
    pub chunks: std::collections::BTreeMap<usize, String>,
    pub seconds: f64,
}

fn shards_dir(dir: &Path) -> PathBuf {
    dir.join("shards")
}

/// Every shard progress file in `dir` for this key (others are ignored).
fn shard_progress(dir: &Path, key: &CacheKey) -> Vec<(PathBuf, ShardProgress)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(shards_dir(dir)) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        if let Ok(sp) = serde_json::from_str::<ShardProgress>(&text) {
            if sp.key == *key && sp.chunk == CHUNK {
                out.push((p, sp));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Chunk -> digest over every shard's finished chunks.
fn shard_digests(dir: &Path, key: &CacheKey) -> std::collections::BTreeMap<usize, String> {
    let mut all = std::collections::BTreeMap::new();
    for (_, sp) in shard_progress(dir, key) {
        all.extend(sp.chunks);
    }
    all
}

fn remove_shard_progress(dir: &Path) {
    let _ = std::fs::remove_dir_all(shards_dir(dir));
}

/// A lock held while one shard of one key is built (two processes given
/// the same shard do not both write it).
fn shard_lock(cache_dir: &Path, key: &CacheKey, shard: Shard) -> Result<File> {
    let p = cache_dir.join(format!(
        ".{}.shard-{}-of-{}.lock",
        key.dir_name(),
        shard.index,
        shard.count
    ));
    let (f, taken) = try_lock(&p)?;
    if !taken {
        crate::config_bail!(
            "shard {shard} of {} is being built by another process",
            cache_dir.join(key.dir_name()).display()
        );
    }
    Ok(f)
}

/// What [`build_shard`] and [`seal`] found or did.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardOutcome {
    /// The whole cache is complete (sealed now or before).
    Complete,
    /// This shard is done; `missing` chunks of other shards are not yet.
    Waiting { missing: usize },
}

/// Builds shard `shard` of the cache for `key` in `cache_dir` (resuming
/// where its progress file says), then seals the cache if every chunk is
/// done: the last shard to finish seals it. The sealed cache is byte-for-
/// byte the one a single process builds (same files, same chunk digests).
pub fn build_shard(
    cache_dir: &Path,
    key: &CacheKey,
    model: &Vgg16,
    data: &Dataset,
    batch: usize,
    shard: Shard,
    obs: &mut dyn Observer,
) -> Result<ShardOutcome> {
    std::fs::create_dir_all(cache_dir).at("cannot create cache directory", cache_dir)?;
    if let Some(d) = find(cache_dir, key) {
        if read_meta(&d.join("meta.json")).is_ok_and(|m| m.complete) {
            obs.info(&format!("cache: {} is already complete", d.display()));
            return Ok(ShardOutcome::Complete);
        }
    }
    let _lock = shard_lock(cache_dir, key, shard)?;
    let dir = cache_dir.join(key.dir_name());
    let n = key.records;
    let chunks = n.div_ceil(CHUNK);
    let prog_p = shards_dir(&dir).join(shard.file_name());
    let mut prog = match std::fs::read_to_string(&prog_p)
        .ok()
        .and_then(|t| serde_json::from_str::<ShardProgress>(&t).ok())
    {
        Some(p) if p.key == *key && p.chunk == CHUNK && p.shard == shard => p,
        _ => ShardProgress {
            key: key.clone(),
            chunk: CHUNK,
            shard,
            chunks: Default::default(),
            seconds: 0.0,
        },
    };
    // Chunks a serial pass already finished count as done too.
    let serial_done = read_meta(&dir.join("meta.json"))
        .ok()
        .filter(|m| m.key == *key && m.chunk == CHUNK)
        .map_or(0, |m| m.chunk_digests.len().min(m.done / CHUNK));
    let todo: Vec<usize> = (serial_done..chunks)
        .filter(|&c| shard.owns(c) && !prog.chunks.contains_key(&c))
        .collect();
    let remaining: usize = todo.iter().map(|&c| (c * CHUNK + CHUNK).min(n) - c * CHUNK).sum();
    std::fs::create_dir_all(shards_dir(&dir)).at("cannot create", &shards_dir(&dir))?;
    announce(&dir, key, data, remaining, &format!(", shard {shard}"), obs)?;
    let w = Writer::open(&dir, key, model, data, batch)?;
    obs.begin(&format!("cache shard {shard}"), remaining as u64, "img");
    let start = std::time::Instant::now();
    let before = prog.seconds;
    {
        let mut done = progress(obs, remaining, start);
        for c in todo {
            let digest = w.chunk(c * CHUNK, (c * CHUNK + CHUNK).min(n), &mut done)?;
            prog.chunks.insert(c, digest);
            prog.seconds = before + start.elapsed().as_secs_f64();
            let json = serde_json::to_vec_pretty(&prog).expect("plain data");
            crate::atomic_write(&prog_p, |f| std::io::Write::write_all(f, &json)).at("cannot write", &prog_p)?;
        }
    }
    obs.end();
    seal(cache_dir, key, obs)
}

/// Seals a cache built by shards once every chunk is done: checks each
/// chunk's bytes against the digest its shard recorded, then writes the
/// complete `meta.json` (what a serial build writes) and removes the shard
/// progress. Safe to call at any time and from any process.
pub fn seal(cache_dir: &Path, key: &CacheKey, obs: &mut dyn Observer) -> Result<ShardOutcome> {
    let _lock = BuildLock::take(cache_dir, key, obs)?;
    let dir = cache_dir.join(key.dir_name());
    let (meta_p, b4_p, gap_p, lab_p) = files(&dir);
    let old = read_meta(&meta_p).ok().filter(|m| m.key == *key && m.chunk == CHUNK);
    if old.as_ref().is_some_and(|m| m.complete) {
        return Ok(ShardOutcome::Complete);
    }
    let n = key.records;
    let chunks = n.div_ceil(CHUNK);
    let mut digests = shard_digests(&dir, key);
    if let Some(m) = &old {
        for (c, d) in m.chunk_digests.iter().enumerate().take(m.done / CHUNK) {
            digests.entry(c).or_insert_with(|| d.clone());
        }
    }
    let missing = (0..chunks).filter(|c| !digests.contains_key(c)).count();
    if missing > 0 {
        return Ok(ShardOutcome::Waiting { missing });
    }
    // Every chunk's bytes against its digest: a merge from the wrong
    // directory, or a shard that wrote elsewhere, is caught here.
    let rec = key.side() * key.side() * 512 * key.dtype.bytes();
    let off = header_for(key).len();
    let f = File::open(&b4_p).at("cannot open", &b4_p)?;
    let mut buf = vec![0u8; CHUNK * rec];
    for c in 0..chunks {
        let (r0, r1) = (c * CHUNK, (c * CHUNK + CHUNK).min(n));
        let b = &mut buf[..(r1 - r0) * rec];
        f.read_exact_at(b, (off + r0 * rec) as u64).at("cannot read", &b4_p)?;
        if crate::data::fetch::hex(&Sha256::digest(&*b)) != digests[&c] {
            return Err(Error::invalid(
                &b4_p,
                format!("records {r0}..{r1} do not match the digest their shard recorded"),
            ));
        }
    }
    let seconds = shard_progress(&dir, key)
        .iter()
        .map(|(_, p)| p.seconds)
        .fold(old.as_ref().map_or(0.0, |m| m.build_seconds), f64::max);
    let meta = Meta {
        key: key.clone(),
        chunk: CHUNK,
        done: n,
        chunk_digests: (0..chunks).map(|c| digests[&c].clone()).collect(),
        complete: true,
        build_seconds: seconds,
        gap_digest: file_digest(&gap_p)?,
        label_digest: file_digest(&lab_p)?,
    };
    write_meta(&meta_p, &meta)?;
    remove_shard_progress(&dir);
    obs.info(&format!(
        "cache: sealed {} ({n} records, all {chunks} chunks checked)",
        dir.display()
    ));
    Ok(ShardOutcome::Complete)
}

/// Copies the chunks shards built into other cache directories (node-local
/// disks) into `cache_dir`, then seals it. Each source is one cache's
/// directory (`<cache-dir>/<split>-<S>px-n<N>-<id>`) holding shard
/// progress; all must be the same cache. Returns the key merged.
pub fn merge(cache_dir: &Path, sources: &[PathBuf], obs: &mut dyn Observer) -> Result<(CacheKey, ShardOutcome)> {
    let mut key: Option<CacheKey> = None;
    let mut found = Vec::new();
    for src in sources {
        let mut any = false;
        let entries = std::fs::read_dir(shards_dir(src)).at("no shard progress in", &shards_dir(src))?;
        for e in entries.flatten() {
            let p = e.path();
            let text = std::fs::read_to_string(&p).at("cannot read", &p)?;
            let sp: ShardProgress = serde_json::from_str(&text)
                .map_err(|e| Error::invalid(&p, format!("not a shard progress file ({e})")))?;
            match &key {
                None => key = Some(sp.key.clone()),
                Some(k) if *k != sp.key => {
                    return Err(Error::invalid(
                        &p,
                        format!("is shard progress of {}, not of {}", sp.key.dir_name(), k.dir_name()),
                    ))
                }
                _ => {}
            }
            if sp.chunk != CHUNK {
                return Err(Error::invalid(&p, format!("chunk {} (expected {CHUNK})", sp.chunk)));
            }
            any = true;
            found.push((src.clone(), p, sp));
        }
        if !any {
            return Err(Error::invalid(src, "holds no shard progress to merge"));
        }
    }
    let key = key.ok_or_else(|| Error::Config("name the shard cache directories to merge".into()))?;
    let dir = cache_dir.join(key.dir_name());
    std::fs::create_dir_all(shards_dir(&dir)).at("cannot create", &shards_dir(&dir))?;
    let n = key.records;
    let rec = key.side() * key.side() * 512 * key.dtype.bytes();
    let (_, b4_p, gap_p, lab_p) = files(&dir);
    let headers = [header_for(&key), header::<f32>(&[n, 512]), header::<u8>(&[n])];
    let per_rec = [rec, 2048, 1];
    let dst: Vec<(File, PathBuf)> = [&b4_p, &gap_p, &lab_p]
        .iter()
        .zip(&headers)
        .zip(per_rec)
        .map(|((p, h), r)| -> Result<(File, PathBuf)> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .at("cannot open", p)?;
            f.set_len((h.len() + n * r) as u64).at("cannot size", p)?;
            f.write_all_at(h, 0).at("cannot write", p)?;
            Ok((f, p.to_path_buf()))
        })
        .collect::<Result<_>>()?;
    let mut copied = 0usize;
    for (src, p, sp) in &found {
        let same = std::fs::canonicalize(src).ok() == std::fs::canonicalize(&dir).ok();
        if !same {
            let (_, sb4, sgap, slab) = files(src);
            for &c in sp.chunks.keys() {
                let (r0, r1) = (c * CHUNK, (c * CHUNK + CHUNK).min(n));
                for (((sp_, (df, dp)), h), r) in [&sb4, &sgap, &slab].iter().zip(&dst).zip(&headers).zip(per_rec) {
                    let sf = File::open(sp_).at("cannot open", sp_)?;
                    let mut b = vec![0u8; (r1 - r0) * r];
                    let at = (h.len() + r0 * r) as u64;
                    sf.read_exact_at(&mut b, at).at("cannot read", sp_)?;
                    df.write_all_at(&b, at).at("cannot write", dp)?;
                }
                copied += r1 - r0;
            }
            for (f, p) in &dst {
                f.sync_data().at("cannot sync", p)?;
            }
            let to = shards_dir(&dir).join(sp.shard.file_name());
            let json = serde_json::to_vec_pretty(sp).expect("plain data");
            crate::atomic_write(&to, |f| std::io::Write::write_all(f, &json)).at("cannot write", &to)?;
        }
        obs.info(&format!(
            "cache merge: shard {} ({} chunks) from {}",
            sp.shard,
            sp.chunks.len(),
            p.display()
        ));
    }
    obs.info(&format!("cache merge: {copied} records copied into {}", dir.display()));
    let out = seal(cache_dir, &key, obs)?;
    Ok((key, out))
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
