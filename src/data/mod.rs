//! Input: datasets (CIFAR-10 / CIFAR-100 binary archives, image folders),
//! download, and VGG-16 preprocessing.
//!
//! Every dataset comes out of here as a [`Dataset`] per split: labels,
//! class names, and [`Records`] that turn any batch of record indices into
//! the network's (B, S, S, 3) input. CIFAR records are 32x32 bytes held in
//! memory and resized 32 -> S; folder records are file paths, decoded in
//! parallel when a batch needs them and resized straight to S, so a folder
//! dataset is never held decoded in memory.

pub mod cifar;
pub mod fetch;
pub mod folder;
pub mod image;

use crate::error::Result;
use ndarray::Array4;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub use folder::{Folder, FolderOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// The CIFAR-10 batch files of this split.
    pub fn members(self) -> &'static [&'static str] {
        cifar::Kind::Cifar10.members(self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// How an image file becomes an S x S input (recorded in caches and saved
/// models, so `predict` does exactly what training did).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resize {
    /// CIFAR: 32x32 records, bilinear 32 -> S; a photo given to `predict`
    /// is first shrunk to 32x32 (triangle filter) like a CIFAR record.
    Cifar32,
    /// Straight to S x S, bilinear, aspect ratio not kept (Keras's
    /// `image_dataset_from_directory` default).
    Stretch,
    /// The largest centred square cropped first, then bilinear to S x S
    /// (Keras's `crop_to_aspect_ratio=True`).
    CenterCrop,
}

impl Resize {
    pub fn name(self) -> &'static str {
        match self {
            Resize::Cifar32 => "cifar32",
            Resize::Stretch => "stretch",
            Resize::CenterCrop => "center-crop",
        }
    }
    pub fn parse(s: &str) -> Option<Resize> {
        match s {
            "cifar32" => Some(Resize::Cifar32),
            "stretch" => Some(Resize::Stretch),
            "center-crop" => Some(Resize::CenterCrop),
            _ => None,
        }
    }
}

/// The records of one split.
#[derive(Clone, Debug)]
pub enum Records {
    /// CIFAR: 3,072 planar RGB bytes (32x32) per record, in memory.
    Cifar(Vec<u8>),
    /// Image files, decoded when a batch needs them.
    Files(FileRecords),
}

#[derive(Clone, Debug)]
pub struct FileRecords {
    pub files: Vec<PathBuf>,
    pub resize: Resize,
    /// SHA-256 over the listing (see [`folder`]): the split's identity.
    pub digest: String,
    /// A per-record hash that orders records within a class for the
    /// seeded, stratified validation split.
    pub order_keys: Vec<u64>,
    /// Records from a `val/` folder (the validation set of a layout with
    /// its own): all false without one.
    pub held_out: Vec<bool>,
}

/// One split: labels, class names and the records.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub split: Split,
    pub labels: Vec<u8>,
    pub class_names: Vec<String>,
    pub records: Records,
    /// What it was read from, for messages ("CIFAR-10 at data/...").
    pub origin: String,
    /// Every image mirrored left-right (the augmentation view).
    pub flip: bool,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Planar RGB bytes of CIFAR record i: R plane, G plane, B plane.
    /// Panics on a folder dataset (its records are files: use [`Dataset::input`]).
    pub fn image(&self, i: usize) -> &[u8] {
        match &self.records {
            Records::Cifar(images) => &images[i * cifar::IMAGE_BYTES..(i + 1) * cifar::IMAGE_BYTES],
            Records::Files(_) => panic!("Dataset::image: a folder dataset's records are files"),
        }
    }

    /// The same records mirrored left to right (a view with its own digest,
    /// so its activation cache is keyed apart).
    pub fn flipped(&self) -> Dataset {
        Dataset {
            flip: true,
            ..self.clone()
        }
    }

    /// How this dataset's images reach S x S.
    pub fn resize(&self) -> Resize {
        match &self.records {
            Records::Cifar(_) => Resize::Cifar32,
            Records::Files(f) => f.resize,
        }
    }

    /// The network input (B, S, S, 3) of records `idx`: preprocessed
    /// (RGB->BGR, minus the ImageNet means) and resized to `size`. Folder
    /// images are decoded here, in parallel; one that fails is an error
    /// naming the file.
    pub fn input(&self, idx: &[usize], size: usize) -> Result<Array4<f32>> {
        let mut x = self.input_unflipped(idx, size)?;
        if self.flip {
            // Mirroring commutes with the half-pixel bilinear resize (its
            // sampling grid is symmetric), so it is applied at size S.
            x.invert_axis(ndarray::Axis(2));
            x = x.as_standard_layout().into_owned();
        }
        Ok(x)
    }

    fn input_unflipped(&self, idx: &[usize], size: usize) -> Result<Array4<f32>> {
        match &self.records {
            Records::Cifar(_) => {
                let recs: Vec<&[u8]> = idx.iter().map(|&i| self.image(i)).collect();
                Ok(image::preprocess_batch(&recs, size))
            }
            Records::Files(f) => {
                let mut out = Array4::<f32>::zeros((idx.len(), size, size, 3));
                if idx.is_empty() {
                    return Ok(out);
                }
                let errors: Vec<crate::Error> = out
                    .as_slice_mut()
                    .expect("fresh")
                    .par_chunks_mut(size * size * 3)
                    .zip(idx.par_iter())
                    .filter_map(|(dst, &i)| image::load_resized_into(&f.files[i], f.resize, size, dst).err())
                    .collect();
                match errors.into_iter().next() {
                    Some(e) => Err(e),
                    None => Ok(out),
                }
            }
        }
    }

    /// The split's identity: SHA-256 over labels then image bytes for CIFAR
    /// (the same whether read from the archive or a directory); the listing
    /// digest for a folder (paths, sizes, modification times, labels, class
    /// names and resize policy).
    pub fn digest(&self) -> String {
        let base = self.records_digest();
        if self.flip {
            return fetch::hex(&Sha256::digest(format!("{base}\nhflip").as_bytes()));
        }
        base
    }

    /// [`Dataset::digest`] of the records as stored (no view).
    fn records_digest(&self) -> String {
        match &self.records {
            Records::Cifar(images) => {
                let mut h = Sha256::new();
                h.update(&self.labels);
                h.update(images);
                fetch::hex(&h.finalize())
            }
            Records::Files(f) => f.digest.clone(),
        }
    }

    /// True for a folder with its own validation set (`val/` beside
    /// `train/` and `test/`): [`Dataset::validation_split`] returns it.
    pub fn has_validation_folder(&self) -> bool {
        matches!(&self.records, Records::Files(r) if r.held_out.iter().any(|&h| h))
    }

    /// Splits records `0..n` into (train, validation) with a fraction `f`
    /// held out. CIFAR: the last round(n f) records (the seed recipe's
    /// split). A folder with a `val/` folder: its records, whatever `f`.
    /// Other folders: stratified, per class the records with the
    /// smallest seeded hash of their path, so adding files to one class
    /// does not move another class's records.
    pub fn validation_split(&self, n: usize, f: f64) -> (Vec<usize>, Vec<usize>) {
        match &self.records {
            Records::Cifar(_) => {
                let n_val = ((n as f64) * f).round() as usize;
                ((0..n - n_val).collect(), (n - n_val..n).collect())
            }
            Records::Files(r) if self.has_validation_folder() => {
                let _ = f; // the folder's own validation set
                (0..n).partition(|&i| !r.held_out[i])
            }
            Records::Files(r) => {
                let held = folder::stratified_pick(&self.labels[..n], &r.order_keys[..n], f);
                let (val, train): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| held[i]);
                (train, val)
            }
        }
    }
}

/// What `--dataset` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    /// CIFAR-10, CIFAR-100 or a folder, whichever `--data` holds (CIFAR-10
    /// first when a directory holds both archives).
    Auto,
    Cifar10,
    Cifar100,
    Folder,
}

impl DatasetKind {
    pub fn parse(s: &str) -> Option<DatasetKind> {
        match s {
            "auto" => Some(DatasetKind::Auto),
            "cifar10" => Some(DatasetKind::Cifar10),
            "cifar100" => Some(DatasetKind::Cifar100),
            "folder" => Some(DatasetKind::Folder),
            _ => None,
        }
    }
}

/// How to read `--data`.
#[derive(Clone, Debug)]
pub struct DataOptions {
    pub kind: DatasetKind,
    /// CIFAR-100's label.
    pub label_mode: cifar::LabelMode,
    pub folder: FolderOptions,
}

impl Default for DataOptions {
    fn default() -> DataOptions {
        DataOptions {
            kind: DatasetKind::Auto,
            label_mode: cifar::LabelMode::Fine,
            folder: FolderOptions::default(),
        }
    }
}

/// A located dataset, ready to load either split.
#[derive(Clone, Debug)]
pub enum DataSource {
    Cifar {
        at: cifar::Source,
        kind: cifar::Kind,
    },
    /// Scanned once: the listing of both splits.
    Folder(Box<Folder>),
}

impl From<cifar::Source> for DataSource {
    fn from(at: cifar::Source) -> DataSource {
        DataSource::Cifar {
            at,
            kind: cifar::Kind::Cifar10,
        }
    }
}

impl DataSource {
    pub fn path(&self) -> &Path {
        match self {
            DataSource::Cifar { at, .. } => at.path(),
            DataSource::Folder(f) => &f.root,
        }
    }

    /// "CIFAR-10 at data/cifar-10-binary.tar.gz", "image folder photos/ (5 classes)".
    pub fn describe(&self) -> String {
        match self {
            DataSource::Cifar { at, kind } => format!("{} at {}", kind.name(), at.path().display()),
            DataSource::Folder(f) => format!(
                "image folder {} ({} classes, {} train / {} test images)",
                f.root.display(),
                f.class_names.len(),
                f.train.len(),
                f.test.len()
            ),
        }
    }

    /// How many classes (the head's width), without reading the records.
    pub fn num_classes(&self) -> usize {
        match self {
            DataSource::Cifar { kind, .. } => kind.classes(),
            DataSource::Folder(f) => f.class_names.len(),
        }
    }

    pub fn load(&self, split: Split) -> Result<Dataset> {
        match self {
            DataSource::Cifar { at, kind } => Ok(cifar::load(at, *kind, split)?),
            DataSource::Folder(f) => Ok(f.dataset(split)),
        }
    }
}

/// Finds the dataset at `path` as `opts` asks. A folder is scanned here
/// (file names and image headers, not the pixels).
pub fn locate(path: &Path, opts: &DataOptions) -> Result<DataSource> {
    let c100 = cifar::Kind::Cifar100(opts.label_mode);
    match opts.kind {
        DatasetKind::Cifar10 => Ok(cifar::locate(path)?.into()),
        DatasetKind::Cifar100 => Ok(DataSource::Cifar {
            at: cifar::locate_kind(path, c100)?,
            kind: c100,
        }),
        DatasetKind::Folder => Ok(DataSource::Folder(Box::new(Folder::scan(path, &opts.folder)?))),
        DatasetKind::Auto => {
            if !path.exists() {
                return Err(cifar::DataError::NotFound(path.to_path_buf()).into());
            }
            if path.is_file() {
                let kind = match cifar::sniff_archive(path) {
                    Some(cifar::Kind::Cifar10) => cifar::Kind::Cifar10,
                    Some(cifar::Kind::Cifar100(_)) => c100,
                    None => cifar::Kind::Cifar10, // reported as what it is when read
                };
                return Ok(DataSource::Cifar {
                    at: cifar::Source::Archive(path.to_path_buf()),
                    kind,
                });
            }
            if let Ok(at) = cifar::locate(path) {
                return Ok(at.into());
            }
            if let Ok(at) = cifar::locate_kind(path, c100) {
                return Ok(DataSource::Cifar { at, kind: c100 });
            }
            if folder::looks_like_folder(path) {
                return Ok(DataSource::Folder(Box::new(Folder::scan(path, &opts.folder)?)));
            }
            Err(crate::Error::invalid(
                path,
                format!(
                    "no dataset found: expected {} or {} (or their extracted directories), or an image folder \
                     (class sub-folders, or train/ and test/ holding class sub-folders); \
                     `vgg16 data fetch` downloads CIFAR-10",
                    cifar::ARCHIVE_NAME,
                    cifar::ARCHIVE_NAME_100
                ),
            ))
        }
    }
}
