//! Saved models, evaluate, predict and the plots, end to end on the
//! committed sample with stand-in weights.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vgg16_cpu::model::saved::{ModelMeta, SavedModel, FORMAT, FORMAT_VERSION};
use vgg16_cpu::report::history::{EpochRecord, StageResult};
use vgg16_cpu::train::State;
use vgg16_cpu::{StageConfig, TrainConfig};

/// How far two routes to one probability may differ: last-bit differences
/// in the features, which these models' logits scale up (O(100): stage 1's
/// lr 0.01 on raw GAP features saturates the softmax), reach 5e-5 in a
/// probability near 0.7 (a relative 3e-6 of the logits; measured between
/// batched and single prediction on the direct and im2col paths).
const PROB_TOL: f64 = 2e-4;

/// The model's logits for CIFAR records, computed here on another route
/// than the program's: the whole base run layer by layer on the im2col
/// path (the program uses Winograd and its cache), then the head.
fn expected_logits(m: &SavedModel, records: &[&[u8]]) -> ndarray::Array2<f32> {
    use vgg16_cpu::tensor::dispatch::{ConvAlgo, Dispatch};
    let d = Dispatch {
        isa: Dispatch::global().isa,
        conv: ConvAlgo::Im2col,
    };
    let x = vgg16_cpu::data::image::preprocess_batch(records, m.meta.image_size);
    let g = m.base.prepare_with(d).features(x);
    vgg16_cpu::model::head_forward(&m.head, g.view(), None).0
}

fn names() -> Vec<String> {
    [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn cfg(hidden: Option<usize>) -> TrainConfig {
    let sc = StageConfig::sgd(0.01, 0.0, 8, 1);
    TrainConfig {
        image_size: 32,
        stage1: sc,
        stage2: sc,
        hidden,
        dropout: 0.0,
        seed: 3,
        classes: 10,
        limit_train: None,
        limit_test: None,
        validation_split: None,
        ..TrainConfig::recipe(32, 10)
    }
}

fn saved(dir: &Path, hidden: Option<usize>) -> PathBuf {
    let base = fake_vgg(21);
    let c = cfg(hidden);
    let s = State::new(&base, &c);
    let meta = ModelMeta {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        stage: 2,
        image_size: 32,
        preprocessing: vgg16_cpu::data::image::PREPROCESSING.into(),
        resize: "cifar32".into(),
        class_names: names(),
        base_weights_digest: base.digest(),
        hidden,
        history: vec![EpochRecord {
            stage: 1,
            epoch: 1,
            train_loss: 2.0,
            train_accuracy: 0.2,
            val_loss: 2.1,
            val_accuracy: 0.19,
            seconds: 1.0,
            images_per_second: 10.0,
        }],
        config: Some(c),
    };
    let p = dir.join("model.npz");
    SavedModel::new(&base, &s.block5, &s.head, meta).save(&p).unwrap();
    p
}

#[test]
fn saved_model_round_trip_and_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    for hidden in [None, Some(16)] {
        let p = saved(tmp.path(), hidden);
        let m = SavedModel::load(&p).unwrap();
        let by_dir = SavedModel::load(tmp.path()).unwrap();
        assert_eq!(m.meta, by_dir.meta);
        assert_eq!(m.meta.hidden, hidden);
        assert_eq!(m.head.hidden.is_some(), hidden.is_some());
        assert_eq!(m.base.digest(), fake_vgg(21).digest(), "untrained block5 = base");
        assert_eq!(m.meta.class_names.len(), 10);
        // Every weight comes back exactly: the head and block5 as saved.
        let s = State::new(&fake_vgg(21), &cfg(hidden));
        assert_eq!(m.head.out.w, s.head.out.w);
        assert_eq!(m.head.out.b, s.head.out.b);
        assert_eq!(
            m.head.hidden.as_ref().map(|d| &d.w),
            s.head.hidden.as_ref().map(|d| &d.w)
        );
        assert_eq!(
            m.head.hidden.as_ref().map(|d| &d.b),
            s.head.hidden.as_ref().map(|d| &d.b)
        );
        for (a, b) in m.block5().iter().zip(&s.block5) {
            assert_eq!((&a.w, &a.b), (&b.w, &b.b));
        }
    }
}

#[test]
fn bad_models_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let p = saved(tmp.path(), None);
    // Other format version.
    let m = SavedModel::load(&p).unwrap();
    let mut meta = m.meta.clone();
    meta.format_version = 99;
    let q = tmp.path().join("v99.npz");
    SavedModel {
        base: m.base.clone(),
        head: m.head.clone(),
        meta,
    }
    .save(&q)
    .unwrap();
    let e = SavedModel::load(&q).err().unwrap().to_string();
    assert!(e.contains("v99.npz") && e.contains("version 99"), "{e}");
    // Base weights alone are not a model.
    let w = tmp.path().join("w.npz");
    m.base.save_npz(&w).unwrap();
    let e = SavedModel::load(&w).err().unwrap().to_string();
    assert!(e.contains("w.npz") && e.contains("not a vgg16-cpu model"), "{e}");
    // A mis-shaped head.
    let mut head = m.head.clone();
    head.out.w = ndarray::Array2::zeros((512, 7));
    head.out.b = ndarray::Array1::zeros(7);
    let r = tmp.path().join("shape.npz");
    SavedModel {
        base: m.base.clone(),
        head,
        meta: m.meta.clone(),
    }
    .save(&r)
    .unwrap();
    let e = SavedModel::load(&r).err().unwrap().to_string();
    assert!(e.contains("shape.npz") && e.contains("classification"), "{e}");
    // Missing file.
    let e = SavedModel::load(&tmp.path().join("nope")).err().unwrap().to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn evaluate_json_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let p = saved(tmp.path(), None);
    let plots = tmp.path().join("plots");
    let data = sample_dir();
    let cache = tmp.path().join("cache");
    let o = vgg16(&[
        "evaluate",
        "--model",
        p.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "40",
        "--json",
        "--plots",
        plots.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The numbers themselves, from logits computed here.
    let m = SavedModel::load(&p).unwrap();
    let test = vgg16_cpu::data::cifar::load_split(
        &vgg16_cpu::data::cifar::locate(&data).unwrap(),
        vgg16_cpu::data::cifar::Split::Test,
    )
    .unwrap();
    let recs: Vec<&[u8]> = (0..40).map(|i| test.image(i)).collect();
    let want = vgg16_cpu::report::metrics::report(&expected_logits(&m, &recs), &test.labels[..40], &m.meta.class_names);
    assert_eq!(v["accuracy"].as_f64().unwrap(), want.accuracy);
    let loss = v["loss"].as_f64().unwrap();
    assert!(
        (loss - want.loss).abs() <= 1e-4 * want.loss.abs(),
        "loss {loss} vs {}",
        want.loss
    );
    let cm = v["confusion_matrix"].as_array().unwrap();
    assert_eq!(cm.len(), 10);
    let total: u64 = cm
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(total, 40);
    assert_eq!(v["per_class"].as_array().unwrap().len(), 10);
    // The text report has scikit-learn's layout.
    let o = vgg16(&[
        "evaluate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "40",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("precision    recall  f1-score   support") && text.contains("weighted avg"),
        "{text}"
    );
    check_png(&plots.join("confusion_matrix.png"), (1000, 900));
}

/// Decodes a PNG and checks it is a real picture: size, several colours,
/// dark pixels (text and lines) on a light background.
fn check_png(path: &Path, size: (u32, u32)) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    assert_eq!(img.dimensions(), size);
    let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
    let white = img.pixels().filter(|p| p.0.iter().all(|&c| c > 245)).count();
    let n = (size.0 * size.1) as usize;
    assert!(
        dark > n / 500,
        "{}: almost no dark pixels (text, axes missing?)",
        path.display()
    );
    assert!(white > n / 4, "{}: background not light", path.display());
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort();
    colours.dedup();
    assert!(colours.len() > 20, "{}: only {} colours", path.display(), colours.len());
}

#[test]
fn history_plot_and_comparison() {
    let tmp = tempfile::tempdir().unwrap();
    let h: Vec<EpochRecord> = (0..7)
        .map(|i| EpochRecord {
            stage: if i < 2 { 1 } else { 2 },
            epoch: if i < 2 { i + 1 } else { i - 1 },
            train_loss: 12.0 / (i + 1) as f64,
            train_accuracy: 0.5 + 0.05 * i as f64,
            val_loss: 11.0 / (i + 1) as f64,
            val_accuracy: 0.5 + 0.04 * i as f64,
            seconds: 1.0,
            images_per_second: 100.0,
        })
        .collect();
    let p = tmp.path().join("history.png");
    vgg16_cpu::report::plots::plot_history(&h, &p).unwrap();
    check_png(&p, (1400, 560));
    let stages = [
        StageResult {
            stage: 1,
            test_loss: 12.3,
            test_accuracy: 0.546,
            seconds: 0.4,
            epochs: 2,
            images_per_second: 1e5,
        },
        StageResult {
            stage: 2,
            test_loss: 0.78,
            test_accuracy: 0.744,
            seconds: 300.0,
            epochs: 5,
            images_per_second: 1000.0,
        },
    ];
    let (md, js) = vgg16_cpu::report::comparison::comparison(180.0, true, &stages, 490.0);
    assert!(
        md.contains("| stage 2: fine-tuning (block5 + head) | 0.7440 | 0.7800 | 5 |"),
        "{md}"
    );
    assert!(md.contains("activation cache"));
    assert_eq!(js["stages"][1]["test_accuracy"], 0.744);
    // A stage of 0 epochs (`--stage2-epochs 0`) shows no time or rate,
    // not "-0.0" and "NaN".
    let none = [StageResult {
        epochs: 0,
        seconds: -0.0,
        images_per_second: f64::NAN,
        ..stages[1].clone()
    }];
    let (md, _) = vgg16_cpu::report::comparison::comparison(1.0, true, &none, 2.0);
    assert!(
        md.contains("| stage 2: fine-tuning (block5 + head) | 0.7440 | 0.7800 | 0 | - | - |"),
        "{md}"
    );
}

#[test]
fn predict_png_jpeg_bmp_and_a_bad_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = saved(tmp.path(), None);
    let mut files = Vec::new();
    for (i, ext) in ["png", "jpg", "bmp"].iter().enumerate() {
        let img = image::RgbImage::from_fn(40 + 7 * i as u32, 33, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 7) as u8, (i * 80) as u8])
        });
        let p = tmp.path().join(format!("img{i}.{ext}"));
        img.save(&p).unwrap();
        files.push(p);
    }
    let bad = tmp.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG but not really").unwrap();
    let mut args: Vec<String> = vec![
        "predict".into(),
        "--model".into(),
        model.to_string_lossy().into(),
        "--top-k".into(),
        "2".into(),
        "--json".into(),
    ];
    args.extend(files.iter().map(|p| p.to_string_lossy().into_owned()));
    args.push(bad.to_string_lossy().into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = vgg16(&argv);
    assert!(!o.status.success(), "an unreadable file makes the exit status non-zero");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("broken.png"), "{err}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "the readable files are still predicted");
    for (l, f) in lines.iter().zip(&files) {
        assert_eq!(l["file"].as_str().unwrap(), f.to_str().unwrap());
        let top = l["top"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        let (p0, p1) = (
            top[0]["probability"].as_f64().unwrap(),
            top[1]["probability"].as_f64().unwrap(),
        );
        assert!(p0 >= p1 && p0 <= 1.0 && p1 >= 0.0);
    }
    // Batched prediction equals one-by-one prediction.
    let one = vgg16(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--json",
        "--top-k",
        "2",
        files[1].to_str().unwrap(),
    ]);
    let single: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    let a = single["top"][0]["probability"].as_f64().unwrap();
    let b = lines[1]["top"][0]["probability"].as_f64().unwrap();
    // GEMM blocking follows the batch shape: last-bit differences only.
    assert!((a - b).abs() < PROB_TOL, "{a} vs {b}");
    // And the probabilities themselves, from logits computed here.
    let m = SavedModel::load(&model).unwrap();
    let recs: Vec<Vec<u8>> = files
        .iter()
        .map(|f| vgg16_cpu::data::image::load_as_cifar(f).unwrap())
        .collect();
    let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
    let probs = vgg16_cpu::tensor::ops::softmax(expected_logits(&m, &refs).view());
    for (l, p) in lines.iter().zip(probs.rows()) {
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&x, &y| p[y].total_cmp(&p[x]));
        for (k, &c) in order[..2].iter().enumerate() {
            let got = &l["top"][k];
            assert_eq!(got["class"].as_str().unwrap(), m.meta.class_names[c], "{l}");
            let q = got["probability"].as_f64().unwrap();
            assert!((q - p[c] as f64).abs() <= PROB_TOL, "{q} vs {}", p[c]);
        }
    }
}
