//! `data fetch` against a small HTTP server of the test's own on 127.0.0.1:
//! whole downloads, interrupted ones resumed with Range, servers that ignore
//! Range, corrupt downloads, and the real archive through the CLI.

mod common;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use vgg16_cpu::data::fetch::{fetch, hex, md5_file, FetchError, Fetched};

#[derive(Clone, Copy)]
struct Behaviour {
    honour_range: bool,
    /// Close the connection after sending this many body bytes, on the
    /// first `cut_times` requests.
    cut_after: Option<usize>,
    cut_times: usize,
}

/// Serves `body` on 127.0.0.1 for up to `max_requests` requests; returns
/// the URL.
fn serve(body: Arc<Vec<u8>>, b: Behaviour, max_requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().take(max_requests).enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut start = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("range: bytes=") {
                    start = v.trim().trim_end_matches('-').parse().unwrap_or(0);
                }
            }
            let (status, from) = if b.honour_range && start > 0 {
                if start >= body.len() {
                    let _ = stream.write_all(
                        b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                ("206 Partial Content", start)
            } else {
                ("200 OK", 0)
            };
            let rest = &body[from..];
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                rest.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let send = match b.cut_after {
                Some(c) if n < b.cut_times => &rest[..c.min(rest.len())],
                _ => rest,
            };
            let _ = stream.write_all(send);
            let _ = stream.flush();
        }
    });
    format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz")
}

fn payload(len: usize) -> Arc<Vec<u8>> {
    Arc::new((0..len).map(|i| (i * 31 % 253) as u8).collect())
}

fn md5_of(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    hex(&Md5::digest(bytes))
}

const WHOLE: Behaviour = Behaviour {
    honour_range: true,
    cut_after: None,
    cut_times: 0,
};

#[test]
fn downloads_verifies_and_then_finds_it_present() {
    let body = payload(300_000);
    let md5 = md5_of(&body);
    let url = serve(body.clone(), WHOLE, 4);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("sub").join("f.tar.gz");
    let r = fetch(&url, &md5, &dest, |_, _| {}).unwrap();
    assert_eq!(
        r,
        Fetched::Downloaded {
            bytes: 300_000,
            resumed_from: 0
        }
    );
    assert_eq!(std::fs::read(&dest).unwrap(), *body);
    assert_eq!(fetch(&url, &md5, &dest, |_, _| {}).unwrap(), Fetched::AlreadyPresent);
}

#[test]
fn interrupted_download_resumes_with_range() {
    let body = payload(500_000);
    let md5 = md5_of(&body);
    let url = serve(
        body.clone(),
        Behaviour {
            honour_range: true,
            cut_after: Some(123_456),
            cut_times: 1,
        },
        4,
    );
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("f.tar.gz");
    let err = fetch(&url, &md5, &dest, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("run again to resume"), "{err}");
    assert!(
        !dest.exists(),
        "an incomplete download must not appear under the final name"
    );
    let part = tmp.path().join("f.tar.gz.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 123_456);
    let mut seen_start = None;
    let r = fetch(&url, &md5, &dest, |done, _| {
        seen_start.get_or_insert(done);
    })
    .unwrap();
    assert_eq!(
        r,
        Fetched::Downloaded {
            bytes: 500_000,
            resumed_from: 123_456
        }
    );
    assert_eq!(seen_start, Some(123_456));
    assert_eq!(std::fs::read(&dest).unwrap(), *body);
    assert!(!part.exists());
}

#[test]
fn server_ignoring_range_restarts_from_zero() {
    let body = payload(200_000);
    let md5 = md5_of(&body);
    let url = serve(
        body.clone(),
        Behaviour {
            honour_range: false,
            cut_after: Some(50_000),
            cut_times: 1,
        },
        4,
    );
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("f.tar.gz");
    assert!(fetch(&url, &md5, &dest, |_, _| {}).is_err());
    let r = fetch(&url, &md5, &dest, |_, _| {}).unwrap();
    assert_eq!(
        r,
        Fetched::Downloaded {
            bytes: 200_000,
            resumed_from: 0
        }
    );
    assert_eq!(std::fs::read(&dest).unwrap(), *body);
}

#[test]
fn wrong_checksum_is_refused_and_cleaned_up() {
    let body = payload(10_000);
    let url = serve(body, WHOLE, 2);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("f.tar.gz");
    let err = fetch(&url, "00000000000000000000000000000000", &dest, |_, _| {}).unwrap_err();
    assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
    assert!(!dest.exists() && !tmp.path().join("f.tar.gz.part").exists());
}

#[test]
fn http_error_status_is_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Some(Ok(mut s)) = listener.incoming().next() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch(
        &format!("http://127.0.0.1:{port}/x"),
        "0",
        &tmp.path().join("x"),
        |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
}

/// The real archive, through the CLI, interrupted once and resumed.
#[test]
#[cfg_attr(not(has_shared), ignore = "needs ../shared (the CIFAR-10 archive)")]
fn cli_fetches_the_shared_archive_with_resume() {
    let shared = common::shared();
    let src = shared.join("data/cifar-10-binary.tar.gz");
    let body = Arc::new(std::fs::read(&src).unwrap());
    let md5 = md5_file(&src).unwrap();
    let url = serve(
        body.clone(),
        Behaviour {
            honour_range: true,
            cut_after: Some(40_000_000),
            cut_times: 1,
        },
        4,
    );
    let tmp = tempfile::tempdir().unwrap();
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_vgg16"))
            .args(["data", "fetch", "--url", &url, "--md5", &md5, "--out"])
            .arg(tmp.path())
            .output()
            .unwrap()
    };
    let first = run();
    assert!(!first.status.success(), "the first, cut, download must fail");
    let second = run();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert!(err.contains("resumed at byte 40000000"), "{err}");
    let dest = tmp.path().join("cifar-10-binary.tar.gz");
    assert_eq!(md5_file(&dest).unwrap(), md5);
    assert!(Path::new(&dest).is_file());
}

/// `data fetch --dataset cifar100` names its archive, and checks the
/// official archive's MD5 unless told another.
#[test]
fn cli_fetch_of_cifar100_names_the_archive_and_checks_its_md5() {
    let body = Arc::new(b"a stand-in for cifar-100-binary.tar.gz".to_vec());
    let md5 = hex(&<md5::Md5 as md5::Digest>::digest(&body[..]));
    let b = Behaviour {
        honour_range: true,
        cut_after: None,
        cut_times: 0,
    };
    let url = serve(body.clone(), b, 4);
    let tmp = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vgg16"))
            .args(["data", "fetch", "--dataset", "cifar100", "--url", &url, "--out"])
            .arg(tmp.path())
            .args(extra)
            .output()
            .unwrap()
    };
    // The default MD5 is the official archive's: this body is refused.
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("03b5dce01913d631647c71ecec9e9cb8"), "{err}");
    assert!(!tmp.path().join("cifar-100-binary.tar.gz").exists());
    let out = run(&["--md5", &md5]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        std::fs::read(tmp.path().join("cifar-100-binary.tar.gz")).unwrap(),
        *body
    );
}
