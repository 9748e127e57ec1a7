//! The binary under `mpirun -np 2` on loopback (feature `mpi`; run with
//! `cargo test --release --features mpi --test mpi`): two ranks equal one
//! process with `--accumulate 2` bit for bit, a cache built by two ranks
//! equals one built alone, and a killed rank fails the job, which then
//! resumes to the uninterrupted result. Without `mpirun` on PATH every test
//! says SKIPPED on stderr and checks nothing else.
#![cfg(feature = "mpi")]

mod common;
use ndarray::ArrayD;
use ndarray_npy::NpzReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample")
}

fn weights(dir: &Path) -> PathBuf {
    let p = dir.join("w.npz");
    common::fake_vgg(8).save_npz(&p).unwrap();
    p
}

fn mpirun_or_skip(test: &str) -> bool {
    let ok = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED {test}: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)");
    }
    ok
}

/// `mpirun -np n vgg16 args...`, 1 thread per rank.
fn mpirun(n: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", &n.to_string()])
        .arg(env!("CARGO_BIN_EXE_vgg16"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // OpenMPI under root in a container: run as root, no ssh, loopback.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,vader,tcp")
        .env("OMPI_MCA_plm_rsh_agent", "false");
    c
}

fn ok(o: Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "{what} failed:\n{err}\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    err
}

/// history.csv without its timing columns.
fn history(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("history.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(6).collect::<Vec<_>>().join(","))
        .collect()
}

fn arrays(p: &Path) -> Vec<(String, ArrayD<f32>)> {
    let mut z = NpzReader::new(std::fs::File::open(p).unwrap()).unwrap();
    let mut names = z.names().unwrap();
    names.sort();
    names
        .into_iter()
        .filter_map(|n| {
            z.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(&n)
                .ok()
                .map(|a| (n, a))
        })
        .collect()
}

fn same_weights(a: &Path, b: &Path) {
    let (x, y) = (arrays(&a.join("checkpoint.npz")), arrays(&b.join("checkpoint.npz")));
    assert!(!x.is_empty());
    assert_eq!(x.len(), y.len());
    for ((n, u), (_, v)) in x.iter().zip(&y) {
        assert!(
            u.iter().zip(v.iter()).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{n} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn train_args<'a>(w: &'a str, cache: &'a str, out: &'a str, epochs2: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        sample().to_str().unwrap().to_string().leak(),
        "--weights",
        w,
        "--image-size",
        "32",
        "--limit-train",
        "300",
        "--limit-test",
        "100",
        "--recipe",
        "tuned",
        "--stage1-epochs",
        "2",
        "--stage2-epochs",
        epochs2,
        "--stage2-batch-size",
        "16",
        "--stage2-lr",
        "1e-4",
        "--hidden",
        "32",
        "--dropout",
        "0.2",
        "--cache-dir",
        cache,
        "--out",
        out,
    ]
}

#[test]
fn two_ranks_equal_one_process_accumulating_two() {
    if !mpirun_or_skip("two_ranks_equal_one_process_accumulating_two") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = weights(tmp.path());
    let p = |s: &str| tmp.path().join(s).to_str().unwrap().to_string();
    let (w, c1, c2, one, two) = (w.to_str().unwrap().to_string(), p("c1"), p("c2"), p("one"), p("two"));
    let mut a = train_args(&w, &c1, &one, "2");
    a.extend(["--accumulate", "2", "--threads", "1"]);
    ok(common::vgg16(&a), "one process");
    // VGG16_OVERLAP=1: each layer's gradients summed while backward runs
    // (by default a one-thread rank, as here, sums after backward).
    let err = ok(
        mpirun(2, &train_args(&w, &c2, &two, "2"))
            .env("VGG16_OVERLAP", "1")
            .output()
            .unwrap(),
        "VGG16_OVERLAP=1 mpirun -np 2",
    );
    assert!(err.contains("data parallel: MPI, 2 ranks"), "{err}");
    // Each layer's gradients were summed while backward ran, every step.
    assert!(
        err.lines().any(|l| l.contains("stage 2 epoch 1: gradient exchange")
            && l.contains("overlapped with backward")
            && !l.contains(" 0 overlapped")),
        "{err}"
    );
    assert_eq!(history(Path::new(&one)), history(Path::new(&two)));
    same_weights(Path::new(&one), Path::new(&two));
    // The default for ranks of one thread: the whole gradient summed after
    // backward; the same numbers.
    let three = p("three");
    let mut a = train_args(&w, &c2, &three, "2");
    a.extend(["--threads", "1"]);
    let err = ok(mpirun(2, &a).output().unwrap(), "mpirun -np 2 ... --threads 1");
    assert!(
        err.lines()
            .any(|l| l.contains("stage 2 epoch 1: gradient exchange") && l.contains(" 0 overlapped")),
        "{err}"
    );
    assert_eq!(history(Path::new(&one)), history(Path::new(&three)));
    same_weights(Path::new(&one), Path::new(&three));
    // The caches the two ranks built in shards are the serial ones.
    for d in std::fs::read_dir(&c1).unwrap().flatten().filter(|d| d.path().is_dir()) {
        let other = Path::new(&c2).join(d.file_name());
        for f in ["block4_pool.npy", "gap.npy", "label.npy"] {
            assert!(
                std::fs::read(d.path().join(f)).unwrap() == std::fs::read(other.join(f)).unwrap(),
                "{f} of {:?}",
                d.file_name()
            );
        }
    }
    // Rank 0 alone wrote the run directory: one of each file.
    assert!(Path::new(&two).join("model.npz").is_file());
}

#[test]
fn cache_build_by_two_ranks_equals_one_process() {
    if !mpirun_or_skip("cache_build_by_two_ranks_equals_one_process") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = weights(tmp.path());
    let p = |s: &str| tmp.path().join(s).to_str().unwrap().to_string();
    let (w, c1, c2) = (w.to_str().unwrap().to_string(), p("c1"), p("c2"));
    let data = sample().to_str().unwrap().to_string();
    let args = |c: &str| -> Vec<String> {
        [
            "cache",
            "build",
            "--data",
            &data,
            "--weights",
            &w,
            "--image-size",
            "32",
            "--limit-train",
            "400",
            "--cache-dir",
            c,
        ]
        .map(String::from)
        .to_vec()
    };
    let a1 = args(&c1);
    ok(
        common::vgg16(&a1.iter().map(|s| s.as_str()).collect::<Vec<_>>()),
        "cache build",
    );
    let a2 = args(&c2);
    let out = ok(
        mpirun(2, &a2.iter().map(|s| s.as_str()).collect::<Vec<_>>())
            .output()
            .unwrap(),
        "mpirun cache build",
    );
    assert!(out.contains("shard 0/2"), "{out}");
    let mut n = 0;
    for d in std::fs::read_dir(&c1).unwrap().flatten().filter(|d| d.path().is_dir()) {
        n += 1;
        let other = Path::new(&c2).join(d.file_name());
        for f in ["block4_pool.npy", "gap.npy", "label.npy"] {
            assert!(std::fs::read(d.path().join(f)).unwrap() == std::fs::read(other.join(f)).unwrap());
        }
        assert!(other.join("meta.json").is_file() && !other.join("shards").exists());
    }
    assert_eq!(n, 2, "train and test caches");
}

/// The pid of rank `r`'s vgg16 process (its environment names the rank).
/// The pid of rank `r` of the job launched as process `root` (mpirun):
/// a vgg16 process descended from `root`, not one of another test's job
/// running at the same time (the tests of this file run in parallel).
fn rank_pid(r: usize, root: u32) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={r}");
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces, so after ')'.
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let descends = |mut pid: u32| {
        while pid > 1 {
            if pid == root {
                return true;
            }
            match parent(pid) {
                Some(p) => pid = p,
                None => return false,
            }
        }
        false
    };
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if exe != Path::new(env!("CARGO_BIN_EXE_vgg16")) || !descends(pid) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_fails_the_job_and_it_resumes() {
    if !mpirun_or_skip("a_killed_rank_fails_the_job_and_it_resumes") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = weights(tmp.path());
    let p = |s: &str| tmp.path().join(s).to_str().unwrap().to_string();
    let (w, c1, c2, one, two) = (w.to_str().unwrap().to_string(), p("c1"), p("c2"), p("one"), p("two"));
    let mut a = train_args(&w, &c1, &one, "4");
    a.extend(["--accumulate", "2", "--threads", "1"]);
    ok(common::vgg16(&a), "one process");

    let mut child = mpirun(2, &train_args(&w, &c2, &two, "4"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill rank 1 once stage 2 has checkpointed an epoch.
    let ckpt = Path::new(&two).join("checkpoint.json");
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&ckpt).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if v["stage"] == 2 && v["epochs_done"].as_u64().is_some_and(|e| (1..4).contains(&e)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no stage-2 checkpoint after 300 s"
        );
        if let Some(s) = child.try_wait().unwrap() {
            panic!("mpirun ended ({s}) before it could be interrupted");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rank_pid(1, child.id()).expect("rank 1 of this job is running");
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the job did not end after rank 1 was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a job with a killed rank must fail");
    assert!(!Path::new(&two).join("metrics.json").exists(), "it did not finish");

    // Resumed under mpirun: the same numbers as the uninterrupted run.
    let err = ok(
        mpirun(
            2,
            &[
                "train",
                "--data",
                sample().to_str().unwrap(),
                "--weights",
                &w,
                "--cache-dir",
                &c2,
                "--resume",
                &two,
            ],
        )
        .output()
        .unwrap(),
        "resume under mpirun",
    );
    assert!(err.contains("resuming"), "{err}");
    assert_eq!(history(Path::new(&one)), history(Path::new(&two)));
    same_weights(Path::new(&one), Path::new(&two));
}
