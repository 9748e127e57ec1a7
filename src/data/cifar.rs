//! CIFAR-10 binary reader: the official `cifar-10-binary.tar.gz` (streamed
//! through gzip and tar in memory, nothing extracted to disk) or an
//! extracted `cifar-10-batches-bin/` directory.
//!
//! Record format: 1 label byte (0..9), then 1,024 R, 1,024 G, 1,024 B bytes,
//! each plane a row-major 32x32 image. Train = data_batch_1..5.bin (50,000
//! records), test = test_batch.bin (10,000), class names in batches.meta.txt.
//! Records of a split are always in that order (batch 1..5, record order),
//! whatever order the archive's members come in.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const SIDE: usize = 32;
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
pub const NUM_CLASSES: usize = 10;
pub const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";
pub const DIR_NAME: &str = "cifar-10-batches-bin";
pub const META_NAME: &str = "batches.meta.txt";

#[derive(Debug, Error)]
pub enum DataError {
    #[error("no CIFAR-10 found at {0}: expected {ARCHIVE_NAME} or a {DIR_NAME}/ directory (run `vgg16 data fetch`)")]
    NotFound(PathBuf),
    #[error(
        "{path}: missing {member} (a CIFAR-10 binary dataset has data_batch_1..5.bin, test_batch.bin and {META_NAME})"
    )]
    MissingMember { path: PathBuf, member: String },
    #[error("{path}: {len} bytes is not a whole number of {RECORD_BYTES}-byte records")]
    BadSize { path: PathBuf, len: usize },
    #[error("{path}: record {record} has label {label}, expected 0..9")]
    BadLabel { path: PathBuf, record: usize, label: u8 },
    #[error("{path}: {found} class names, expected {NUM_CLASSES} (one a line)")]
    BadMeta { path: PathBuf, found: usize },
    #[error("{path}: corrupt or truncated archive: {err}")]
    Archive { path: PathBuf, err: std::io::Error },
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: empty (a CIFAR-10 batch file holds {RECORD_BYTES}-byte records)")]
    Empty { path: PathBuf },
    #[error("{path}: {found} records, but {first} has {expected} (the training batch files of one dataset are the same size; truncated?)")]
    Uneven {
        path: PathBuf,
        found: usize,
        first: String,
        expected: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn members(self) -> &'static [&'static str] {
        match self {
            Split::Train => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            Split::Test => &["test_batch.bin"],
        }
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
        if path.join(DIR_NAME).is_dir() {
            return Ok(Source::Dir(path.join(DIR_NAME)));
        }
        if path.join(META_NAME).is_file()
            || path.join("data_batch_1.bin").is_file()
            || path.join("test_batch.bin").is_file()
        {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        if path.join(ARCHIVE_NAME).is_file() {
            return Ok(Source::Archive(path.join(ARCHIVE_NAME)));
        }
    }
    Err(DataError::NotFound(path.to_path_buf()))
}

/// One split in memory: `images` holds N records' 3,072 planar RGB bytes.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub split: Split,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub class_names: Vec<String>,
    pub source: Source,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Planar RGB bytes of record i: R plane, G plane, B plane.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }
}

/// Reads one split (all its members, in order) and the class names.
pub fn load_split(source: &Source, split: Split) -> Result<Dataset, DataError> {
    let mut wanted: Vec<&str> = split.members().to_vec();
    wanted.push(META_NAME);
    let files = read_members(source, &wanted)?;
    let class_names = parse_meta(&source.path().join(META_NAME), &files[META_NAME])?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let first = split.members()[0];
    for m in split.members() {
        let bytes = &files[*m];
        let shown = source.path().join(m);
        if bytes.is_empty() {
            return Err(DataError::Empty { path: shown });
        }
        if !bytes.len().is_multiple_of(RECORD_BYTES) {
            return Err(DataError::BadSize {
                path: shown,
                len: bytes.len(),
            });
        }
        let (found, expected) = (bytes.len() / RECORD_BYTES, files[first].len() / RECORD_BYTES);
        if found != expected {
            return Err(DataError::Uneven {
                path: shown,
                found,
                first: first.to_string(),
                expected,
            });
        }
        parse_records(&shown, bytes, &mut images, &mut labels)?;
    }
    Ok(Dataset {
        split,
        images,
        labels,
        class_names,
        source: source.clone(),
    })
}

/// Appends the records of one batch file to `images` / `labels`, checking
/// the size and every label.
pub fn parse_records(path: &Path, bytes: &[u8], images: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<(), DataError> {
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(DataError::BadSize {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    images.reserve(bytes.len() / RECORD_BYTES * IMAGE_BYTES);
    for (record, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = rec[0];
        if label as usize >= NUM_CLASSES {
            return Err(DataError::BadLabel {
                path: path.to_path_buf(),
                record,
                label,
            });
        }
        labels.push(label);
        images.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// Class names, one a line, blank lines ignored.
pub fn parse_meta(path: &Path, bytes: &[u8]) -> Result<Vec<String>, DataError> {
    let text = String::from_utf8_lossy(bytes);
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != NUM_CLASSES {
        return Err(DataError::BadMeta {
            path: path.to_path_buf(),
            found: names.len(),
        });
    }
    Ok(names)
}

/// Reads the named members (by file name) from a directory or an archive.
fn read_members(source: &Source, wanted: &[&str]) -> Result<HashMap<String, Vec<u8>>, DataError> {
    let mut found = HashMap::new();
    match source {
        Source::Dir(dir) => {
            for name in wanted {
                let p = dir.join(name);
                if !p.is_file() {
                    return Err(DataError::MissingMember {
                        path: dir.clone(),
                        member: name.to_string(),
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
                    });
                }
            }
        }
    }
    Ok(found)
}
