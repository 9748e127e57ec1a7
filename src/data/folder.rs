//! Image-folder datasets, in the two layouts Keras's
//! `image_dataset_from_directory` and PyTorch's `ImageFolder` users have:
//!
//! ```text
//! DIR/train/<class>/**/*.jpg     DIR/<class>/**/*.jpg
//! DIR/test/<class>/**/*.jpg      (split here: --test-split, --validation-split)
//!   (test/ may be called val/ or validation/; with both test/ and val/,
//!    val/ is the validation set)
//! ```
//!
//! Class names are the class sub-folders' names in sorted (byte) order, the
//! label their index, as Keras does. Files are images by extension (JPEG,
//! PNG, BMP, WebP, GIF; any case) and must have a readable image header;
//! hidden files and folders (names starting with '.') are skipped, other
//! files are counted as non-images, and an unreadable image is named and
//! skipped (`strict`: an error). Scanning reads names, sizes, modification
//! times and image headers, never the pixels.
//!
//! Record order within a split is a fixed hash of each file's relative
//! path, so `--limit-train N` takes a mix of classes. In the flat layout a
//! file goes to the test split by a seeded hash of its relative path,
//! stratified per class (each class gives round(F n_class) files), so
//! adding files to one class never moves another class's files.
//!
//! Identity (the cache key's dataset digest): SHA-256 over the class
//! names, the resize policy and, per record in order, the relative path,
//! label, size in bytes and modification time (ns). One documented choice:
//! metadata, not content, so a 50,000-image folder is identified in a
//! second; a file replaced or touched gives a new digest and so a new cache,
//! never a stale one.

use super::{Dataset, FileRecords, Records, Resize, Split};
use crate::error::{Error, IoContext, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// File name extensions read as images (lower case).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "webp", "gif"];
/// Labels are stored as one byte.
pub const MAX_CLASSES: usize = 256;
/// The test fraction of a flat folder when `--test-split` is not given.
pub const DEFAULT_TEST_SPLIT: f64 = 0.2;

#[derive(Clone, Debug, PartialEq)]
pub struct FolderOptions {
    /// Flat layout: fraction of each class held out as the test split.
    pub test_split: Option<f64>,
    /// Seed of the flat layout's test split and of the validation split.
    pub split_seed: u64,
    pub resize: Resize,
    /// An unreadable image is an error instead of a skipped file.
    pub strict: bool,
}

impl Default for FolderOptions {
    fn default() -> FolderOptions {
        FolderOptions {
            test_split: None,
            split_seed: 1337,
            resize: Resize::Stretch,
            strict: false,
        }
    }
}

/// One image file of the listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the dataset root.
    pub rel: PathBuf,
    pub label: u8,
    pub bytes: u64,
    pub mtime_ns: i128,
    /// From the `val/` folder of a layout that also has `test/`: a
    /// training-split record held out for validation.
    pub held_out: bool,
}

/// What the scan left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Skipped {
    /// Hidden files and folders.
    pub hidden: usize,
    /// Files without an image extension.
    pub not_images: usize,
    /// Image files whose header could not be read: (path, why).
    pub unreadable: Vec<(PathBuf, String)>,
    /// Files straight in a split folder, outside any class folder.
    pub loose: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `train/` and a test folder (`test/`, `val/` or `validation/`); with
    /// both `test/` and `val/` (or `validation/`), the latter is the
    /// validation set.
    Split {
        train: String,
        test: String,
        val: Option<String>,
    },
    /// Class folders at the top; the test split is drawn from them.
    Flat { test_split: u64 },
}

/// A scanned folder dataset.
#[derive(Clone, Debug)]
pub struct Folder {
    pub root: PathBuf,
    pub layout: Layout,
    pub class_names: Vec<String>,
    pub train: Vec<Entry>,
    pub test: Vec<Entry>,
    pub skipped: Skipped,
    pub options: FolderOptions,
}

/// True when `path` is a directory with at least one visible sub-folder
/// (so it may be an image folder).
pub fn looks_like_folder(path: &Path) -> bool {
    subdirs(path).map(|d| !d.is_empty()).unwrap_or(false)
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

/// Visible sub-folder names of `dir`, sorted by their bytes.
fn subdirs(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).at("cannot read folder", dir)? {
        let e = e.at("cannot read folder", dir)?;
        if is_hidden(&e.file_name()) {
            continue;
        }
        // Follows symbolic links, like the walk below.
        if e.path().is_dir() {
            out.push(e.file_name());
        }
    }
    out.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    Ok(out)
}

/// FNV-1a, 64 bit: a stable hash (same on every platform and version) for
/// record order and splits.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn rel_bytes(rel: &Path) -> &[u8] {
    rel.as_os_str().as_encoded_bytes()
}

/// Per class, the round(f n_class) records with the smallest keys: a
/// stratified pick (true = picked) that moves no record of a class when
/// another class changes.
pub fn stratified_pick(labels: &[u8], keys: &[u64], f: f64) -> Vec<bool> {
    let mut picked = vec![false; labels.len()];
    let mut by_class: std::collections::BTreeMap<u8, Vec<usize>> = Default::default();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    for idx in by_class.values_mut() {
        idx.sort_by_key(|&i| (keys[i], i));
        let k = ((idx.len() as f64) * f).round() as usize;
        for &i in &idx[..k.min(idx.len())] {
            picked[i] = true;
        }
    }
    picked
}

impl Folder {
    /// Scans `root` (see the module docs).
    pub fn scan(root: &Path, opts: &FolderOptions) -> Result<Folder> {
        if !root.is_dir() {
            return Err(Error::invalid(
                root,
                "not a directory (an image folder has class sub-folders)",
            ));
        }
        let top = subdirs(root)?;
        let named = |n: &str| top.iter().any(|d| d == n);
        let test_dir = ["test", "val", "validation"].into_iter().find(|n| named(n));
        let mut skipped = Skipped::default();
        let (layout, class_names, train, test) = if named("train") {
            let Some(test_dir) = test_dir else {
                return Err(Error::invalid(
                    root,
                    "has train/ but no test/, val/ or validation/ beside it (or put the class folders at the top and use --test-split)",
                ));
            };
            if opts.test_split.is_some() {
                crate::config_bail!(
                    "{} has its own {test_dir}/ split: --test-split applies only to a folder of class sub-folders",
                    root.display()
                );
            }
            let classes = class_list(&root.join("train"))?;
            let train = scan_split(root, "train", &classes, opts, &mut skipped)?;
            check_subset(root, test_dir, &classes)?;
            let test = scan_split(root, test_dir, &classes, opts, &mut skipped)?;
            // test/ and val/ both: val/ is the validation set, scanned into
            // the training split and marked held out.
            let val_dir = if test_dir == "test" {
                ["val", "validation"].into_iter().find(|n| named(n))
            } else {
                None
            };
            let mut train = train;
            if let Some(v) = val_dir {
                check_subset(root, v, &classes)?;
                let mut val = scan_split(root, v, &classes, opts, &mut skipped)?;
                val.iter_mut().for_each(|e| e.held_out = true);
                train.extend(val);
                train.sort_by_cached_key(order_key);
            }
            let layout = Layout::Split {
                train: "train".into(),
                test: test_dir.into(),
                val: val_dir.map(String::from),
            };
            (layout, classes, train, test)
        } else {
            let f = opts.test_split.unwrap_or(DEFAULT_TEST_SPLIT);
            if !(0.0..1.0).contains(&f) {
                crate::config_bail!("--test-split {f}: expected a fraction in [0, 1)");
            }
            let classes = class_list(root)?;
            let all = scan_split(root, "", &classes, opts, &mut skipped)?;
            let labels: Vec<u8> = all.iter().map(|e| e.label).collect();
            let seed = opts.split_seed.to_le_bytes();
            let keys: Vec<u64> = all
                .iter()
                .map(|e| fnv1a(&[b"test", &seed, rel_bytes(&e.rel)]))
                .collect();
            let is_test = stratified_pick(&labels, &keys, f);
            let (mut train, mut test) = (Vec::new(), Vec::new());
            for (e, t) in all.into_iter().zip(is_test) {
                if t {
                    test.push(e)
                } else {
                    train.push(e)
                }
            }
            // The fraction is part of the identity (it decides the split).
            (
                Layout::Flat {
                    test_split: f.to_bits(),
                },
                classes,
                train,
                test,
            )
        };
        if train.is_empty() {
            return Err(Error::invalid(root, "no readable training images"));
        }
        if test.is_empty() {
            return Err(Error::invalid(
                root,
                "no test images (give the flat layout a larger --test-split, or fill the test folder)",
            ));
        }
        Ok(Folder {
            root: root.to_path_buf(),
            layout,
            class_names,
            train,
            test,
            skipped,
            options: opts.clone(),
        })
    }

    /// One split as a [`Dataset`] whose records are the files.
    pub fn dataset(&self, split: Split) -> Dataset {
        let entries = match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        };
        let seed = self.options.split_seed.to_le_bytes();
        FileRecords {
            files: entries.iter().map(|e| self.root.join(&e.rel)).collect(),
            resize: self.options.resize,
            digest: self.digest(split),
            order_keys: entries
                .iter()
                .map(|e| fnv1a(&[b"val", &seed, rel_bytes(&e.rel)]))
                .collect(),
            held_out: entries.iter().map(|e| e.held_out).collect(),
        }
        .into_dataset(
            split,
            entries.iter().map(|e| e.label).collect(),
            self.class_names.clone(),
            format!("image folder {}", self.root.display()),
        )
    }

    /// The split's identity (module docs).
    pub fn digest(&self, split: Split) -> String {
        let entries = match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        };
        let mut h = Sha256::new();
        h.update(b"vgg16-folder-v1\n");
        h.update(self.options.resize.name().as_bytes());
        h.update(format!("\n{:?}\n{}\n", self.layout, split.name()).as_bytes());
        for c in &self.class_names {
            h.update(c.as_bytes());
            h.update(b"\n");
        }
        for e in entries {
            h.update(rel_bytes(&e.rel));
            h.update([0, e.label, e.held_out as u8]);
            h.update(e.bytes.to_le_bytes());
            h.update(e.mtime_ns.to_le_bytes());
        }
        super::fetch::hex(&h.finalize())
    }

    /// One line on what the scan skipped, or None.
    pub fn skipped_summary(&self) -> Option<String> {
        let s = &self.skipped;
        let mut parts = Vec::new();
        if !s.unreadable.is_empty() {
            parts.push(format!("{} unreadable image(s)", s.unreadable.len()));
        }
        if s.not_images > 0 {
            parts.push(format!("{} non-image file(s)", s.not_images));
        }
        if s.hidden > 0 {
            parts.push(format!("{} hidden file(s) or folder(s)", s.hidden));
        }
        if s.loose > 0 {
            parts.push(format!("{} file(s) outside any class folder", s.loose));
        }
        (!parts.is_empty()).then(|| format!("{}: skipped {}", self.root.display(), parts.join(", ")))
    }
}

impl FileRecords {
    fn into_dataset(self, split: Split, labels: Vec<u8>, class_names: Vec<String>, origin: String) -> Dataset {
        Dataset {
            split,
            labels,
            class_names,
            records: Records::Files(self),
            origin,
            flip: false,
        }
    }
}

/// A test or validation folder may lack classes, not add any.
fn check_subset(root: &Path, dir: &str, classes: &[String]) -> Result<()> {
    for d in subdirs(&root.join(dir))? {
        let name = d.to_string_lossy();
        if !classes.iter().any(|c| *c == name) {
            return Err(Error::invalid(
                &root.join(dir).join(&d),
                format!("class '{name}' is not in train/ (the classes are train/'s sub-folders)"),
            ));
        }
    }
    Ok(())
}

/// Record order: a fixed hash of the relative path (then the path).
fn order_key(e: &Entry) -> (u64, PathBuf) {
    (fnv1a(&[b"order", rel_bytes(&e.rel)]), e.rel.clone())
}

/// The class names under `dir`: its visible sub-folders, sorted.
fn class_list(dir: &Path) -> Result<Vec<String>> {
    let dirs = subdirs(dir)?;
    if dirs.len() < 2 {
        return Err(Error::invalid(
            dir,
            format!(
                "{} class folder(s): a classifier needs at least 2 (one sub-folder per class)",
                dirs.len()
            ),
        ));
    }
    if dirs.len() > MAX_CLASSES {
        return Err(Error::invalid(
            dir,
            format!("{} class folders: at most {MAX_CLASSES} are supported", dirs.len()),
        ));
    }
    dirs.into_iter()
        .map(|d| {
            d.into_string().map_err(|d| {
                Error::invalid(
                    &dir.join(&d),
                    "a class folder's name must be UTF-8 (it becomes the class name)",
                )
            })
        })
        .collect()
}

/// Files under `dir`, recursively, in sorted order, hidden files and
/// folders left out; a folder that cannot be read is an error naming it.
fn visible_files(dir: &Path) -> impl Iterator<Item = Result<walkdir::DirEntry>> + '_ {
    walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !is_hidden(e.file_name()))
        .map(move |e| {
            e.map_err(|err| {
                let at = err.path().map(Path::to_path_buf).unwrap_or_else(|| dir.to_path_buf());
                Error::Io {
                    what: "cannot read folder",
                    path: at,
                    source: err
                        .into_io_error()
                        .unwrap_or_else(|| std::io::Error::other("file system loop")),
                }
            })
        })
        .filter(|e| e.as_ref().map_or(true, |e| e.file_type().is_file()))
}

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Lists `root/split_dir/<class>/**` for every class, checks each image's
/// header in parallel, and orders the records by the hash of their paths.
fn scan_split(
    root: &Path,
    split_dir: &str,
    classes: &[String],
    opts: &FolderOptions,
    skipped: &mut Skipped,
) -> Result<Vec<Entry>> {
    let base = if split_dir.is_empty() {
        root.to_path_buf()
    } else {
        root.join(split_dir)
    };
    // Files straight in the split folder are in no class.
    for e in std::fs::read_dir(&base).at("cannot read folder", &base)?.flatten() {
        if !is_hidden(&e.file_name()) && e.path().is_file() {
            skipped.loose += 1;
        }
    }
    let mut candidates: Vec<(PathBuf, u8)> = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = base.join(class);
        if !dir.is_dir() {
            continue; // a test folder may lack a class
        }
        for e in visible_files(&dir) {
            let e = e?;
            if is_image_name(e.path()) {
                candidates.push((e.into_path(), label as u8));
            } else {
                skipped.not_images += 1;
            }
        }
    }
    // Hidden entries were filtered out of the walk; count them once here.
    skipped.hidden += count_hidden(&base, classes);
    let checked: Vec<std::result::Result<Entry, (PathBuf, String)>> = candidates
        .into_par_iter()
        .map(|(p, label)| {
            let md = std::fs::metadata(&p).map_err(|e| (p.clone(), e.to_string()))?;
            let dims = ::image::ImageReader::open(&p)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| (p.clone(), e.to_string()))?
                .into_dimensions()
                .map_err(|e| (p.clone(), format!("not a readable image ({e})")))?;
            if dims.0 == 0 || dims.1 == 0 {
                return Err((p.clone(), "image of zero size".into()));
            }
            let mtime_ns = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            Ok(Entry {
                rel: p.strip_prefix(root).unwrap_or(&p).to_path_buf(),
                label,
                bytes: md.len(),
                mtime_ns,
                held_out: false,
            })
        })
        .collect();
    let mut entries = Vec::with_capacity(checked.len());
    for c in checked {
        match c {
            Ok(e) => entries.push(e),
            Err((p, why)) if opts.strict => {
                return Err(Error::invalid(
                    &p,
                    format!("{why} (--strict: unreadable images are errors)"),
                ))
            }
            Err(bad) => skipped.unreadable.push(bad),
        }
    }
    entries.sort_by_cached_key(order_key);
    Ok(entries)
}

/// Hidden files and folders directly or deeply inside the class folders
/// (each hidden folder counts once, not its contents).
fn count_hidden(base: &Path, classes: &[String]) -> usize {
    let mut n = 0;
    for class in classes {
        let walk = walkdir::WalkDir::new(base.join(class)).follow_links(true).into_iter();
        let mut it = walk;
        while let Some(Ok(e)) = it.next() {
            if e.depth() > 0 && is_hidden(e.file_name()) {
                n += 1;
                if e.file_type().is_dir() {
                    it.skip_current_dir();
                }
            }
        }
    }
    n
}

/// The image files named by `paths`: a file is taken as it is (whatever
/// its extension); a directory is walked recursively in sorted order,
/// keeping files with an image extension and skipping hidden ones.
/// Returns the files and how many others the walk passed over.
pub fn image_files(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, usize)> {
    let mut out = Vec::new();
    let mut others = 0;
    for p in paths {
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        for e in visible_files(p) {
            let e = e?;
            if is_image_name(e.path()) {
                out.push(e.into_path());
            } else {
                others += 1;
            }
        }
    }
    Ok((out, others))
}
