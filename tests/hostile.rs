//! Hostile and careless input, one test per defect found by the hostile
//! review (issue 10): each is rejected with a message naming the file or
//! the setting, or detected and rebuilt; never used silently.

mod common;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use vgg16_cpu::data::cifar::{self, Split};
use vgg16_cpu::features::cache::{self, CacheKey, Dtype, Outcome};
use vgg16_cpu::model::saved::SavedModel;
use vgg16_cpu::{Silent, TrainConfig, TrainJob};

fn err_text(e: impl std::error::Error) -> String {
    vgg16_cpu::error::chain(&e)
}

/// A copy of the sample's directory, for damaging.
fn sample_copy(dir: &Path) -> PathBuf {
    let d = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(sample_dir().join("cifar-10-batches-bin")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    d
}

fn small_config() -> TrainConfig {
    small_recipe(1337, 32, 16, 1)
}

fn job(data: &Path, out: &Path, cache_dir: &Path) -> TrainJob {
    let mut j = TrainJob::new(
        small_config(),
        cifar::locate(data).unwrap(),
        fake_vgg(8),
        out.to_path_buf(),
    );
    j.cache_dir = cache_dir.to_path_buf();
    j
}

// 1. `cache rm` removes only its own caches.
#[test]
fn cache_rm_never_removes_a_directory_that_is_not_a_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_vgg(2);
    let data = cifar::load_split(&cifar::locate(&sample_dir()).unwrap(), Split::Test).unwrap();
    let k = CacheKey::new(&model.digest(), 32, &data, 20, Dtype::F32);
    cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut Silent).unwrap();
    let mine = tmp.path().join("photos-2024");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("meta.json"), b"{\"not\": \"ours\"}").unwrap();
    std::fs::write(mine.join("holiday.jpg"), b"precious").unwrap();

    let e = cache::remove(tmp.path(), false, &["photos-2024".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("photos-2024") && e.contains("not a vgg16 cache"), "{e}");
    assert!(mine.join("holiday.jpg").is_file());

    let done = cache::remove(tmp.path(), true, &[]).unwrap();
    assert_eq!(done.removed.len(), 1, "{done:?}");
    assert_eq!(done.skipped, ["photos-2024"]);
    assert!(mine.join("holiday.jpg").is_file());
    assert!(!tmp.path().join(k.dir_name()).exists());
}

// 2. Every cached file is verified, and the key inside is the one asked for.
#[test]
fn a_changed_gap_file_or_a_renamed_cache_is_never_used() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_vgg(3);
    let data = cifar::load_split(&cifar::locate(&sample_dir()).unwrap(), Split::Test).unwrap();
    let k = CacheKey::new(&model.digest(), 32, &data, 20, Dtype::F32);
    let (c, _) = cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut Silent).unwrap();
    let gap_before = c.gap.clone();
    let dir = c.dir.clone();
    drop(c);

    // One float of gap.npy changed (still finite, same shape).
    let gp = dir.join("gap.npy");
    let mut bytes = std::fs::read(&gp).unwrap();
    let last = bytes.len() - 4;
    bytes[last..].copy_from_slice(&1234.5f32.to_le_bytes());
    std::fs::write(&gp, &bytes).unwrap();
    let e = cache::open(&dir, &k, &data)
        .err()
        .expect("a changed gap.npy is detected");
    assert!(err_text(&e).contains("gap.npy"), "{}", err_text(&e));
    let (c, o) = cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut Silent).unwrap();
    assert!(matches!(o, Outcome::Built { .. }), "{o:?}");
    assert_eq!(c.gap, gap_before);
    drop(c);

    // A cache from before gap/label digests were recorded: opened, and the
    // digests recorded then, so a later change is caught.
    let mp = dir.join("meta.json");
    let mut meta: cache::Meta = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    meta.gap_digest.clear();
    meta.label_digest.clear();
    std::fs::write(&mp, serde_json::to_vec(&meta).unwrap()).unwrap();
    assert!(cache::open(&dir, &k, &data).unwrap().is_some());
    let meta: cache::Meta = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    assert_eq!(meta.gap_digest.len(), 64);
    std::fs::write(&gp, &bytes).unwrap();
    assert!(cache::open(&dir, &k, &data).is_err());
    let (c, _) = cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut Silent).unwrap();
    assert_eq!(c.gap, gap_before);
    drop(c);

    // The same cache copied under the name of another key (64 px).
    let k64 = CacheKey::new(&model.digest(), 64, &data, 20, Dtype::F32);
    let fake = tmp.path().join(k64.dir_name());
    std::fs::create_dir_all(&fake).unwrap();
    for f in ["meta.json", "block4_pool.npy", "gap.npy", "label.npy"] {
        std::fs::copy(dir.join(f), fake.join(f)).unwrap();
    }
    let e = cache::open(&fake, &k64, &data)
        .err()
        .expect("a renamed cache is refused");
    assert!(err_text(&e).contains("not the one asked for"), "{}", err_text(&e));
    let (c, o) = cache::open_or_build(tmp.path(), &k64, &model, &data, 32, &mut Silent).unwrap();
    assert!(matches!(o, Outcome::Built { .. }), "{o:?}");
    assert_eq!(c.meta.key, k64);
}

// 3. Empty, short and corrupted inputs.
#[test]
fn empty_short_or_corrupted_data_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = sample_copy(&tmp.path().join("empty"));
    std::fs::write(d.join("test_batch.bin"), b"").unwrap();
    let e = cifar::load_split(&cifar::locate(&d).unwrap(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(e.contains("test_batch.bin") && e.contains("empty"), "{e}");

    let d = sample_copy(&tmp.path().join("short"));
    let p = d.join("data_batch_3.bin");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10 * cifar::RECORD_BYTES]).unwrap();
    let e = cifar::load_split(&cifar::locate(&d).unwrap(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("data_batch_3.bin") && e.contains("90 records"), "{e}");

    // An archive whose gzip trailer (CRC32) is damaged.
    let a = tmp.path().join("cifar-10-binary.tar.gz");
    {
        let f = std::fs::File::create(&a).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        tar.append_dir_all("cifar-10-batches-bin", sample_dir().join("cifar-10-batches-bin"))
            .unwrap();
        tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
    }
    let good = cifar::load_split(&cifar::locate(&a).unwrap(), Split::Train).unwrap();
    assert_eq!(good.len(), 500);
    let mut bytes = std::fs::read(&a).unwrap();
    let crc = bytes.len() - 8;
    bytes[crc] ^= 0x55;
    std::fs::write(&a, &bytes).unwrap();
    for split in [Split::Train, Split::Test] {
        let e = cifar::load_split(&cifar::locate(&a).unwrap(), split)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cifar-10-binary.tar.gz") && e.contains("corrupt"), "{e}");
    }

    // Zero records asked for.
    let mut c = small_config();
    c.limit_test = Some(0);
    assert!(c.check().unwrap_err().to_string().contains("--limit-test 0"));
}

// 4 and 6. Sizes and hyper-parameters that cannot work.
#[test]
fn impossible_settings_are_refused_up_front() {
    type Edit = Box<dyn Fn(&mut TrainConfig)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("--image-size", Box::new(|c| c.image_size = 1 << 40)),
        ("--image-size", Box::new(|c| c.image_size = 33)),
        ("--stage2-lr", Box::new(|c| c.stage2.lr = f64::NAN)),
        ("--stage1-lr", Box::new(|c| c.stage1.lr = -0.1)),
        ("--stage2-momentum", Box::new(|c| c.stage2.momentum = 1.0)),
        ("--hidden 0", Box::new(|c| c.hidden = Some(0))),
        ("--dropout", Box::new(|c| c.dropout = 1.0)),
        ("--stage2-batch-size", Box::new(|c| c.stage2.batch_size = 0)),
    ];
    for (flag, edit) in cases {
        let mut c = small_config();
        edit(&mut c);
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains(flag), "{flag}: {e}");
    }
    // The binary says so and exits 1 (no panic, no allocation attempt).
    let out = vgg16(&["train", "--image-size", "1099511627776", "--data", "/nonexistent"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("up to 1024"), "{err}");
}

// 5, 7, 8: saved-model metadata, --resume identity, --out over a run.
#[test]
fn saved_runs_and_models_are_checked_before_use() {
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let out = tmp.path().join("run");
    job(&sample_dir(), &out, &cache_dir).run(&mut Silent).unwrap();

    // 8. A fresh run into the same directory is refused, and leaves it as it was.
    let before = std::fs::read(out.join("model.npz")).unwrap();
    let e = job(&sample_dir(), &out, &cache_dir)
        .run(&mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds a run") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(out.join("model.npz")).unwrap(), before);

    // 5. Model metadata with a bad field.
    type ModelEdit = Box<dyn Fn(&mut SavedModel)>;
    let m = SavedModel::load(&out).unwrap();
    for (field, edit) in [
        (
            "image_size 0",
            Box::new(|m: &mut SavedModel| m.meta.image_size = 0) as ModelEdit,
        ),
        ("image_size 33", Box::new(|m| m.meta.image_size = 33)),
        ("stage 7", Box::new(|m| m.meta.stage = 7)),
        (
            "base_weights_digest",
            Box::new(|m| m.meta.base_weights_digest = "x".into()),
        ),
    ] {
        let mut bad = SavedModel {
            base: m.base.clone(),
            head: m.head.clone(),
            meta: m.meta.clone(),
        };
        edit(&mut bad);
        let p = tmp.path().join("bad.npz");
        bad.save(&p).unwrap();
        let e = SavedModel::load(&p).err().unwrap().to_string();
        assert!(e.contains("bad.npz") && e.contains(field), "{field}: {e}");
    }

    // 7. Resume with other data: one test image changed.
    let other = sample_copy(&tmp.path().join("other"));
    let p = other.join("test_batch.bin");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    let mut r = TrainJob::resume(&out, cifar::locate(&other).unwrap(), fake_vgg(8)).unwrap();
    r.cache_dir = cache_dir.clone();
    let e = r.run(&mut Silent).unwrap_err().to_string();
    assert!(e.contains("test data"), "{e}");
    // Other weights.
    let mut r = TrainJob::resume(&out, cifar::locate(&sample_dir()).unwrap(), fake_vgg(9)).unwrap();
    r.cache_dir = cache_dir.clone();
    let e = r.run(&mut Silent).unwrap_err().to_string();
    assert!(e.contains("base weights"), "{e}");
    // An edited epoch count.
    let jp = out.join("checkpoint.json");
    let original = std::fs::read_to_string(&jp).unwrap();
    std::fs::write(&jp, original.replacen("\"epochs_done\": 1", "\"epochs_done\": 4", 1)).unwrap();
    let e = err_text(
        TrainJob::resume(&out, cifar::locate(&sample_dir()).unwrap(), fake_vgg(8))
            .err()
            .unwrap(),
    );
    assert!(e.contains("checkpoint.json") && e.contains("inconsistent"), "{e}");
    std::fs::write(&jp, &original).unwrap();
    // Another run's arrays beside this run's JSON.
    let out2 = tmp.path().join("run2");
    let mut j2 = job(&sample_dir(), &out2, &cache_dir);
    j2.config.seed = 99;
    j2.run(&mut Silent).unwrap();
    std::fs::copy(out2.join("checkpoint.npz"), out.join("checkpoint.npz")).unwrap();
    let mut r = TrainJob::resume(&out, cifar::locate(&sample_dir()).unwrap(), fake_vgg(8)).unwrap();
    r.cache_dir = cache_dir;
    let e = r.run(&mut Silent).unwrap_err().to_string();
    assert!(e.contains("checkpoint.npz") && e.contains("does not belong"), "{e}");
}

// "A failed run leaves no empty run directory."
#[test]
fn a_run_that_fails_before_writing_leaves_no_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let d = sample_copy(&tmp.path().join("bad"));
    std::fs::write(d.join("test_batch.bin"), b"").unwrap();
    let e = job(&d, &out, &tmp.path().join("cache"))
        .run(&mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("test_batch.bin"), "{e}");
    assert!(!out.exists(), "{} left behind", out.display());
}

// 9. An error's chain says each thing once.
#[test]
fn error_chains_do_not_repeat_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("broken.png");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let e = err_text(vgg16_cpu::data::image::load_as_cifar(&png).unwrap_err());
    let parts: Vec<&str> = e.split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "{e}");
    }
    let a = tmp.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&a, b"\x1f\x8b\x08\x00garbage").unwrap();
    let e = err_text(cifar::load_split(&cifar::locate(&a).unwrap(), Split::Test).unwrap_err());
    let parts: Vec<&str> = e.split(": ").collect();
    assert!(parts.windows(2).all(|w| w[0] != w[1]) && parts.len() <= 3, "{e}");
}

// 10. Two processes (here: threads) building one cache do the work once.
#[test]
fn concurrent_builds_of_one_cache_do_the_work_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_vgg(4);
    let data = cifar::load_split(&cifar::locate(&sample_dir()).unwrap(), Split::Test).unwrap();
    let k = CacheKey::new(&model.digest(), 32, &data, 60, Dtype::F32);
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let (c, o) = cache::open_or_build(tmp.path(), &k, &model, &data, 16, &mut Silent).unwrap();
                    assert_eq!(c.len(), 60);
                    o
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let built = outcomes.iter().filter(|o| matches!(o, Outcome::Built { .. })).count();
    assert_eq!(built, 1, "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Hit), "{outcomes:?}");
}
