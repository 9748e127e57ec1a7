//! Resumable, verified download of one file over HTTP(S).
//!
//! Bytes go to `<dest>.part`; an interrupted download resumes with a Range
//! request (a server that ignores Range, answering 200, restarts it from
//! zero). The whole file's MD5 is checked before it is renamed to `dest`, so
//! a file at `dest` is always complete and verified.

use md5::{Digest, Md5};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The official CIFAR-10 binary archive.
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
pub const CIFAR10_BYTES: u64 = 170_052_171;
pub const CIFAR100_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz";
pub const CIFAR100_MD5: &str = "03b5dce01913d631647c71ecec9e9cb8";
pub const CIFAR100_BYTES: u64 = 168_513_733;

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("download of {url} failed: {msg}")]
    Http { url: String, msg: String },
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error(
        "{path}: MD5 is {got}, expected {expected}: the download is corrupt and was deleted; run the command again"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        got: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FetchError + '_ {
    move |e| FetchError::Io {
        path: path.to_path_buf(),
        err: e,
    }
}

/// MD5 of a file, lower-case hex.
pub fn md5_file(path: &Path) -> Result<String, FetchError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What happened, for the caller to report.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// `dest` already held the verified file.
    AlreadyPresent,
    /// Downloaded; `resumed_from` > 0 when a partial download was continued.
    Downloaded { bytes: u64, resumed_from: u64 },
}

/// Downloads `url` to `dest`, resuming `<dest>.part`, verifying `md5`.
/// `progress` is called with (bytes so far, total if known).
pub fn fetch(
    url: &str,
    md5: &str,
    dest: &Path,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<Fetched, FetchError> {
    if dest.is_file() && md5_file(dest)? == md5 {
        return Ok(Fetched::AlreadyPresent);
    }
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let part = PathBuf::from(format!("{}.part", dest.display()));
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let http = |msg: String| FetchError::Http {
        url: url.to_string(),
        msg,
    };

    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut req = agent.get(url);
    if have > 0 {
        req = req.header("Range", &format!("bytes={have}-"));
    }
    let mut resp = req.call().map_err(|e| http(e.to_string()))?;
    let status = resp.status().as_u16();
    let (mut file, start) = match status {
        206 => (OpenOptions::new().append(true).open(&part).map_err(io(&part))?, have),
        200 => (File::create(&part).map_err(io(&part))?, 0),
        416 if have > 0 => {
            // Nothing left to send: the part may already be whole.
            return finish(&part, dest, md5, have, have);
        }
        s => return Err(http(format!("HTTP status {s}"))),
    };
    let remaining: Option<u64> = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let total = remaining.map(|r| r + start);
    let mut body = resp.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = start;
    progress(done, total);
    loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| http(format!("connection lost after {done} bytes ({e}); run again to resume")))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(io(&part))?;
        done += n as u64;
        progress(done, total);
    }
    file.sync_all().map_err(io(&part))?;
    drop(file);
    if let Some(t) = total {
        if done < t {
            return Err(http(format!(
                "connection closed after {done} of {t} bytes; run again to resume"
            )));
        }
    }
    finish(&part, dest, md5, done, start)
}

fn finish(part: &Path, dest: &Path, md5: &str, bytes: u64, resumed_from: u64) -> Result<Fetched, FetchError> {
    let got = md5_file(part)?;
    if got != md5 {
        let _ = std::fs::remove_file(part);
        return Err(FetchError::Checksum {
            path: dest.to_path_buf(),
            expected: md5.to_string(),
            got,
        });
    }
    std::fs::rename(part, dest).map_err(io(dest))?;
    Ok(Fetched::Downloaded { bytes, resumed_from })
}
