//! CIFAR-10 and CIFAR-100 binary readers: the official
//! `cifar-10-binary.tar.gz` / `cifar-100-binary.tar.gz` (streamed through
//! gzip and tar in memory, nothing extracted to disk) or their extracted
//! `cifar-10-batches-bin/` / `cifar-100-binary/` directories.
//!
//! CIFAR-10 record: 1 label byte (0..9), then 1,024 R, 1,024 G, 1,024 B
//! bytes, each plane a row-major 32x32 image. Train = data_batch_1..5.bin
//! (50,000 records), test = test_batch.bin (10,000), class names in
//! batches.meta.txt.
//!
//! CIFAR-100 record: 2 label bytes (coarse 0..19, fine 0..99), then the
//! same 3,072 image bytes. Train = train.bin (50,000), test = test.bin
//! (10,000), class names in fine_label_names.txt / coarse_label_names.txt;
//! `LabelMode` picks which label is the class.
//!
//! Records of a split are always in file order (batch 1..5, record order),
//! whatever order the archive's members come in.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub use super::{Dataset, Records, Split};

pub const SIDE: usize = 32;
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;
/// A CIFAR-10 record (1 label byte + image).
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
pub const NUM_CLASSES: usize = 10;
pub const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";
pub const DIR_NAME: &str = "cifar-10-batches-bin";
pub const META_NAME: &str = "batches.meta.txt";
pub const ARCHIVE_NAME_100: &str = "cifar-100-binary.tar.gz";
pub const DIR_NAME_100: &str = "cifar-100-binary";

/// Which CIFAR-100 label is the class: the 100 fine classes or the 20
/// superclasses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LabelMode {
    Fine,
    Coarse,
}

impl LabelMode {
    pub fn parse(s: &str) -> Option<LabelMode> {
        match s {
            "fine" => Some(LabelMode::Fine),
            "coarse" => Some(LabelMode::Coarse),
            _ => None,
        }
    }
}

/// Which of the two archives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Cifar10,
    Cifar100(LabelMode),
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Cifar10 => "CIFAR-10",
            Kind::Cifar100(LabelMode::Fine) => "CIFAR-100 (fine labels)",
            Kind::Cifar100(LabelMode::Coarse) => "CIFAR-100 (coarse labels)",
        }
    }
    pub fn archive_name(self) -> &'static str {
        match self {
            Kind::Cifar10 => ARCHIVE_NAME,
            Kind::Cifar100(_) => ARCHIVE_NAME_100,
        }
    }
    pub fn dir_name(self) -> &'static str {
        match self {
            Kind::Cifar10 => DIR_NAME,
            Kind::Cifar100(_) => DIR_NAME_100,
        }
    }
    /// The batch files of a split, in record order.
    pub fn members(self, split: Split) -> &'static [&'static str] {
        match (self, split) {
            (Kind::Cifar10, Split::Train) => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            (Kind::Cifar10, Split::Test) => &["test_batch.bin"],
            (Kind::Cifar100(_), Split::Train) => &["train.bin"],
            (Kind::Cifar100(_), Split::Test) => &["test.bin"],
        }
    }
    /// The file of class names, one a line.
    pub fn meta_name(self) -> &'static str {
        match self {
            Kind::Cifar10 => META_NAME,
            Kind::Cifar100(LabelMode::Fine) => "fine_label_names.txt",
            Kind::Cifar100(LabelMode::Coarse) => "coarse_label_names.txt",
        }
    }
    /// Label bytes before each image.
    pub fn label_bytes(self) -> usize {
        match self {
            Kind::Cifar10 => 1,
            Kind::Cifar100(_) => 2,
        }
    }
    pub fn record_bytes(self) -> usize {
        self.label_bytes() + IMAGE_BYTES
    }
    /// Which label byte is the class.
    fn label_at(self) -> usize {
        match self {
            Kind::Cifar10 | Kind::Cifar100(LabelMode::Coarse) => 0,
            Kind::Cifar100(LabelMode::Fine) => 1,
        }
    }
    pub fn classes(self) -> usize {
        match self {
            Kind::Cifar10 => 10,
            Kind::Cifar100(LabelMode::Fine) => 100,
            Kind::Cifar100(LabelMode::Coarse) => 20,
        }
    }
    /// Files whose presence in a directory marks the extracted dataset.
    fn markers(self) -> &'static [&'static str] {
        match self {
            Kind::Cifar10 => &[META_NAME, "data_batch_1.bin", "test_batch.bin"],
            Kind::Cifar100(_) => &["fine_label_names.txt", "coarse_label_names.txt", "train.bin"],
        }
    }
}

#[derive(Debug, Error)]
pub enum DataError {
    #[error("no CIFAR-10 found at {0}: expected {ARCHIVE_NAME} or a {DIR_NAME}/ directory (run `vgg16 data fetch`)")]
    NotFound(PathBuf),
    #[error(
        "no {what} found at {path}: expected {archive} or a {dir}/ directory (run `vgg16 data fetch --dataset {flag}`)"
    )]
    NotFoundKind {
        path: PathBuf,
        what: &'static str,
        archive: &'static str,
        dir: &'static str,
        flag: &'static str,
    },
    #[error("{path}: missing {member} (the binary dataset has {expected})")]
    MissingMember {
        path: PathBuf,
        member: String,
        expected: String,
    },
    #[error("{path}: {len} bytes is not a whole number of {record}-byte records")]
    BadSize { path: PathBuf, len: usize, record: usize },
    #[error("{path}: record {record} has label {label}, expected 0..{}", classes - 1)]
    BadLabel {
        path: PathBuf,
        record: usize,
        label: u8,
        classes: usize,
    },
    #[error("{path}: {found} class names, expected {expected} (one a line)")]
    BadMeta {
        path: PathBuf,
        found: usize,
        expected: usize,
    },
    #[error("{path}: corrupt or truncated archive: {err}")]
    Archive { path: PathBuf, err: std::io::Error },
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: empty (a batch file holds {record}-byte records)")]
    Empty { path: PathBuf, record: usize },
    #[error("{path}: {found} records, but {first} has {expected} (the training batch files of one dataset are the same size; truncated?)")]
    Uneven {
        path: PathBuf,
        found: usize,
        first: String,
        expected: usize,
    },
}

/// Where a dataset lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Archive(PathBuf),
    Dir(PathBuf),
}

impl Source {
    pub fn path(&self) -> &Path {
        match self {
            Source::Archive(p) | Source::Dir(p) => p,
        }
    }
}

/// Finds CIFAR-10 at `path`: the archive itself, a directory holding the
/// batch files, or a directory holding `cifar-10-batches-bin/` or the
/// archive (the extracted directory wins).
pub fn locate(path: &Path) -> Result<Source, DataError> {
    locate_kind(path, Kind::Cifar10)
}

/// [`locate`] for either archive.
pub fn locate_kind(path: &Path, kind: Kind) -> Result<Source, DataError> {
    if path.is_file() {
        return Ok(Source::Archive(path.to_path_buf()));
    }
    if path.is_dir() {
        // An unreadable directory is not an empty one.
        if let Err(err) = std::fs::read_dir(path) {
            return Err(DataError::Io {
                path: path.to_path_buf(),
                err,
            });
        }
        if path.join(kind.dir_name()).is_dir() {
            return Ok(Source::Dir(path.join(kind.dir_name())));
        }
        if kind.markers().iter().any(|m| path.join(m).is_file()) {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        if path.join(kind.archive_name()).is_file() {
            return Ok(Source::Archive(path.join(kind.archive_name())));
        }
    }
    Err(match kind {
        Kind::Cifar10 => DataError::NotFound(path.to_path_buf()),
        Kind::Cifar100(_) => DataError::NotFoundKind {
            path: path.to_path_buf(),
            what: "CIFAR-100",
            archive: ARCHIVE_NAME_100,
            dir: DIR_NAME_100,
            flag: "cifar100",
        },
    })
}

/// Which CIFAR an archive holds, from its first member's path (reads a
/// few kilobytes); None when it is neither.
pub fn sniff_archive(path: &Path) -> Option<Kind> {
    let f = File::open(path).ok()?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(f));
    let mut ar = tar::Archive::new(gz);
    let mut entries = ar.entries().ok()?;
    let first = entries.next()?.ok()?;
    let p = first.path().ok()?.to_string_lossy().into_owned();
    if p.starts_with(DIR_NAME_100) {
        Some(Kind::Cifar100(LabelMode::Fine))
    } else if p.starts_with(DIR_NAME) {
        Some(Kind::Cifar10)
    } else {
        None
    }
}

/// Reads one CIFAR-10 split (all its members, in order) and the class names.
pub fn load_split(source: &Source, split: Split) -> Result<Dataset, DataError> {
    load(source, Kind::Cifar10, split)
}

/// Reads one split of either archive.
pub fn load(source: &Source, kind: Kind, split: Split) -> Result<Dataset, DataError> {
    let mut wanted: Vec<&str> = kind.members(split).to_vec();
    wanted.push(kind.meta_name());
    let files = read_members(source, kind, &wanted)?;
    let meta = kind.meta_name();
    let class_names = parse_meta_kind(&source.path().join(meta), &files[meta], kind)?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let members = kind.members(split);
    let first = members[0];
    let rb = kind.record_bytes();
    for m in members {
        let bytes = &files[*m];
        let shown = source.path().join(m);
        if bytes.is_empty() {
            return Err(DataError::Empty {
                path: shown,
                record: rb,
            });
        }
        if !bytes.len().is_multiple_of(rb) {
            return Err(DataError::BadSize {
                path: shown,
                len: bytes.len(),
                record: rb,
            });
        }
        let (found, expected) = (bytes.len() / rb, files[first].len() / rb);
        if found != expected {
            return Err(DataError::Uneven {
                path: shown,
                found,
                first: first.to_string(),
                expected,
            });
        }
        parse_records_kind(&shown, bytes, kind, &mut images, &mut labels)?;
    }
    Ok(Dataset {
        split,
        labels,
        class_names,
        records: Records::Cifar(images),
        origin: format!("{} at {}", kind.name(), source.path().display()),
        flip: false,
    })
}

/// Appends the records of one CIFAR-10 batch file to `images` / `labels`,
/// checking the size and every label.
pub fn parse_records(path: &Path, bytes: &[u8], images: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<(), DataError> {
    parse_records_kind(path, bytes, Kind::Cifar10, images, labels)
}

/// [`parse_records`] for either archive.
pub fn parse_records_kind(
    path: &Path,
    bytes: &[u8],
    kind: Kind,
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<(), DataError> {
    let rb = kind.record_bytes();
    if !bytes.len().is_multiple_of(rb) {
        return Err(DataError::BadSize {
            path: path.to_path_buf(),
            len: bytes.len(),
            record: rb,
        });
    }
    images.reserve(bytes.len() / rb * IMAGE_BYTES);
    for (record, rec) in bytes.chunks_exact(rb).enumerate() {
        let label = rec[kind.label_at()];
        if label as usize >= kind.classes() {
            return Err(DataError::BadLabel {
                path: path.to_path_buf(),
                record,
                label,
                classes: kind.classes(),
            });
        }
        labels.push(label);
        images.extend_from_slice(&rec[kind.label_bytes()..]);
    }
    Ok(())
}

/// CIFAR-10 class names, one a line, blank lines ignored.
pub fn parse_meta(path: &Path, bytes: &[u8]) -> Result<Vec<String>, DataError> {
    parse_meta_kind(path, bytes, Kind::Cifar10)
}

/// Class names of either archive, one a line, blank lines ignored.
pub fn parse_meta_kind(path: &Path, bytes: &[u8], kind: Kind) -> Result<Vec<String>, DataError> {
    let text = String::from_utf8_lossy(bytes);
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != kind.classes() {
        return Err(DataError::BadMeta {
            path: path.to_path_buf(),
            found: names.len(),
            expected: kind.classes(),
        });
    }
    Ok(names)
}

/// Reads the named members (by file name) from a directory or an archive.
fn read_members(source: &Source, kind: Kind, wanted: &[&str]) -> Result<HashMap<String, Vec<u8>>, DataError> {
    let mut found = HashMap::new();
    match source {
        Source::Dir(dir) => {
            for name in wanted {
                let p = dir.join(name);
                if !p.is_file() {
                    return Err(DataError::MissingMember {
                        path: dir.clone(),
                        member: name.to_string(),
                        expected: expected(kind),
                    });
                }
                let bytes = std::fs::read(&p).map_err(|err| DataError::Io { path: p.clone(), err })?;
                found.insert(name.to_string(), bytes);
            }
        }
        Source::Archive(path) => {
            let f = File::open(path).map_err(|err| DataError::Io {
                path: path.clone(),
                err,
            })?;
            let gz = flate2::read::GzDecoder::new(BufReader::with_capacity(1 << 20, f));
            let mut ar = tar::Archive::new(gz);
            let bad = |err: std::io::Error| DataError::Archive {
                path: path.clone(),
                err,
            };
            for entry in ar.entries().map_err(bad)? {
                let mut entry = entry.map_err(bad)?;
                let name = entry
                    .path()
                    .map_err(bad)?
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                let Some(name) = name else { continue };
                if !wanted.contains(&name.as_str()) || !entry.header().entry_type().is_file() {
                    continue;
                }
                // The header's size is outside data: reserve at most 64 MiB
                // on its word (a member is 30 MB; read_to_end grows past).
                let mut buf = Vec::with_capacity(entry.size().min(64 << 20) as usize);
                entry.read_to_end(&mut buf).map_err(bad)?;
                found.insert(name, buf);
            }
            // Read to the end of the gzip stream, whose trailer (CRC32 and
            // length of the whole archive) is checked only there.
            std::io::copy(&mut ar.into_inner(), &mut std::io::sink()).map_err(bad)?;
            for name in wanted {
                if !found.contains_key(*name) {
                    return Err(DataError::MissingMember {
                        path: path.clone(),
                        member: name.to_string(),
                        expected: expected(kind),
                    });
                }
            }
        }
    }
    Ok(found)
}

/// The member files a dataset of `kind` has, for error messages.
fn expected(kind: Kind) -> String {
    let mut all: Vec<&str> = kind.members(Split::Train).to_vec();
    all.extend(kind.members(Split::Test));
    all.push(kind.meta_name());
    all.join(", ")
}
