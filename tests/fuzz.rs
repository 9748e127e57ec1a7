//! Property tests of every parser of outside bytes: the CIFAR-10 reader
//! (directory and .tar.gz), `.npz` conv parameters, the ONNX importer, the
//! saved model's metadata and the activation cache's metadata. Inputs are
//! valid files with random truncations, bit flips and edited length
//! fields, or random bytes; the property is always the same: an answer or
//! an error, never a panic (and a damaged file is never read as valid
//! data, where the format has a checksum).
//!
//! Cases per property: `PROPTEST_CASES` (default below, sized for CI). The
//! long run before a release, >= 10 minutes per property:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz -- --test-threads 1`.

mod common;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use vgg16_cpu::data::cifar::{self, Split};
use vgg16_cpu::features::cache::{self, CacheKey, Dtype};
use vgg16_cpu::model::params::{NpzIn, NpzOut};
use vgg16_cpu::model::saved::ModelMeta;

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A damage: truncate at a fraction of the length, flip bits, or
/// overwrite 8 bytes (a length or size field) with an extreme value.
#[derive(Clone, Debug)]
enum Damage {
    Truncate(f64),
    Flip(Vec<(f64, u8)>),
    Field(f64, u64),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0.0..1.0f64).prop_map(Damage::Truncate),
        prop::collection::vec((0.0..1.0f64, 1..=255u8), 1..8).prop_map(Damage::Flip),
        (
            0.0..1.0f64,
            prop_oneof![Just(0u64), Just(u64::MAX), Just(1 << 40), any::<u64>()]
        )
            .prop_map(|(at, v)| Damage::Field(at, v)),
    ]
}

fn apply(bytes: &[u8], d: &Damage) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let at = |f: f64, n: usize| ((f * n as f64) as usize).min(n.saturating_sub(1));
    match d {
        Damage::Truncate(f) => b.truncate(at(*f, bytes.len())),
        Damage::Flip(flips) => {
            for &(f, mask) in flips {
                let i = at(f, b.len());
                b[i] ^= mask;
            }
        }
        Damage::Field(f, v) => {
            let i = at(*f, b.len().saturating_sub(8));
            let n = 8.min(b.len() - i);
            b[i..i + n].copy_from_slice(&v.to_le_bytes()[..n]);
        }
    }
    b
}

/// A tiny CIFAR-10 archive (2 records a batch) and its members.
/// (archive bytes, [(member name, bytes)]).
type Archive = (Vec<u8>, Vec<(String, Vec<u8>)>);

fn tiny_archive() -> &'static Archive {
    static A: OnceLock<Archive> = OnceLock::new();
    A.get_or_init(|| {
        let meta = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
        let mut files = vec![("batches.meta.txt".to_string(), meta.as_bytes().to_vec())];
        for name in [
            "data_batch_1",
            "data_batch_2",
            "data_batch_3",
            "data_batch_4",
            "data_batch_5",
            "test_batch",
        ] {
            let bytes: Vec<u8> = (0..2u8)
                .flat_map(|j| {
                    let mut r = vec![j % 10];
                    r.extend((0..3072).map(|i| (i % 253) as u8 ^ j));
                    r
                })
                .collect();
            files.push((format!("{name}.bin"), bytes));
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        {
            let mut tar = tar::Builder::new(&mut gz);
            for (name, bytes) in &files {
                let mut h = tar::Header::new_gnu();
                h.set_size(bytes.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                tar.append_data(&mut h, format!("cifar-10-batches-bin/{name}"), bytes.as_slice())
                    .unwrap();
            }
            tar.finish().unwrap();
        }
        (gz.finish().unwrap(), files)
    })
}

/// A small cache of the sample's test split, built once: (its root, its
/// block4_pool.npy bytes, the split, the key).
fn built_cache() -> &'static (tempfile::TempDir, Vec<u8>, cifar::Dataset, CacheKey) {
    type Built = (tempfile::TempDir, Vec<u8>, cifar::Dataset, CacheKey);
    static CACHE: OnceLock<Built> = OnceLock::new();
    CACHE.get_or_init(|| {
        let model = fake_vgg(5);
        let data = cifar::load_split(&cifar::locate(&sample_dir()).unwrap(), Split::Test).unwrap();
        let key = CacheKey::new(&model.digest(), 32, &data, 12, Dtype::F32);
        let t = tempfile::tempdir().unwrap();
        let (c, _) = cache::open_or_build(t.path(), &key, &model, &data, 8, &mut vgg16_cpu::Silent).unwrap();
        let b4 = std::fs::read(c.dir.join("block4_pool.npy")).unwrap();
        (t, b4, data, key)
    })
}

proptest! {
    #![proptest_config(config(2000))]

    /// The .tar.gz reader: damaged archives load as the original or fail.
    #[test]
    fn cifar_archive_never_panics(d in damage()) {
        let (archive, _) = tiny_archive();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("cifar-10-binary.tar.gz");
        std::fs::write(&p, apply(archive, &d)).unwrap();
        let src = cifar::locate(&p).unwrap();
        let (_, files) = tiny_archive();
        for split in [Split::Train, Split::Test] {
            if let Ok(ds) = cifar::load_split(&src, split) {
                // gzip's CRC32 guards the content: what loads is the original.
                let want: Vec<u8> = split
                    .members()
                    .iter()
                    .flat_map(|m| files.iter().find(|(n, _)| n == m).unwrap().1.clone())
                    .collect();
                let got: Vec<u8> = (0..ds.len()).flat_map(|i| {
                    let mut r = vec![ds.labels[i]];
                    r.extend_from_slice(ds.image(i));
                    r
                }).collect();
                prop_assert_eq!(got, want);
            }
        }
    }

    /// The directory reader on damaged batch and meta files.
    #[test]
    fn cifar_directory_never_panics(which in 0usize..7, d in damage()) {
        let (_, files) = tiny_archive();
        let tmp = tempfile::tempdir().unwrap();
        for (i, (name, bytes)) in files.iter().enumerate() {
            let b = if i == which { apply(bytes, &d) } else { bytes.clone() };
            std::fs::write(tmp.path().join(name), b).unwrap();
        }
        let src = cifar::locate(tmp.path()).unwrap();
        for split in [Split::Train, Split::Test] {
            let _ = cifar::load_split(&src, split);
        }
    }

    /// Conv parameters in .npz (the base weights, saved models and
    /// checkpoints all read them this way).
    #[test]
    fn npz_conv_params_never_panic(d in damage()) {
        static NPZ: OnceLock<Vec<u8>> = OnceLock::new();
        let good = NPZ.get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("w.npz");
            let mut r = rng(3);
            let params = vgg16_cpu::model::vgg::ConvParams {
                w: rand4(&mut r, (3, 3, 2, 3), -1.0, 1.0),
                b: rand1(&mut r, 3, -1.0, 1.0),
            };
            vgg16_cpu::atomic_write(&p, |f| {
                let mut npz = NpzOut::new(f);
                npz.convs([("a".to_string(), &params)])?;
                npz.finish()
            })
            .unwrap();
            std::fs::read(&p).unwrap()
        });
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("w.npz");
        std::fs::write(&p, apply(good, &d)).unwrap();
        if let Ok(mut npz) = NpzIn::open(&p) {
            if let Ok(c) = npz.conv("a", 2, 3) {
                prop_assert_eq!(c.w.dim(), (3, 3, 2, 3));
                prop_assert!(c.w.iter().chain(c.b.iter()).all(|v| v.is_finite()));
            }
        }
    }

    /// The ONNX importer on random bytes.
    #[test]
    fn onnx_import_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = vgg16_cpu::model::onnx_import::weights_from_onnx(&bytes, Path::new("fuzz.onnx"));
    }

    /// A saved model's metadata, parsed and checked, after damage to its JSON.
    #[test]
    fn model_meta_never_panics(d in damage()) {
        static META: OnceLock<Vec<u8>> = OnceLock::new();
        let good = META.get_or_init(|| {
            let m = ModelMeta {
                format: vgg16_cpu::model::saved::FORMAT.into(),
                format_version: vgg16_cpu::model::saved::FORMAT_VERSION,
                stage: 2,
                image_size: 32,
                preprocessing: vgg16_cpu::data::image::PREPROCESSING.into(),
                resize: "cifar32".into(),
                class_names: (0..10).map(|i| format!("c{i}")).collect(),
                base_weights_digest: "ab".repeat(32),
                hidden: None,
                history: vec![],
                config: Some(small_recipe(1, 10, 10, 1)),
            };
            serde_json::to_vec_pretty(&m).unwrap()
        });
        if let Ok(m) = serde_json::from_slice::<ModelMeta>(&apply(good, &d)) {
            let _ = m.check();
        }
    }

    /// A cache's meta.json with extreme numbers in every numeric field.
    #[test]
    fn cache_meta_numbers_never_panic(field in 0usize..4, v in prop_oneof![Just(0usize), Just(usize::MAX), Just(1 << 40), any::<usize>()]) {
        let (root, _, data, key) = built_cache();
        let good = root.path().join(key.dir_name());
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(key.dir_name());
        std::fs::create_dir_all(&dir).unwrap();
        for n in ["block4_pool.npy", "gap.npy", "label.npy"] {
            std::fs::copy(good.join(n), dir.join(n)).unwrap();
        }
        let mut meta: cache::Meta = serde_json::from_slice(&std::fs::read(good.join("meta.json")).unwrap()).unwrap();
        match field {
            0 => meta.key.records = v,
            1 => meta.chunk = v,
            2 => meta.done = v,
            _ => meta.key.image_size = v,
        }
        std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        let _ = cache::open(&dir, key, data);
    }

    /// An activation cache whose files are damaged: refused or rebuilt,
    /// never a panic, never served with other values.
    #[test]
    fn cache_files_never_panic(file in 0usize..4, d in damage()) {
        let (root, good_b4, data, key) = built_cache();
        let good_dir = root.path().join(key.dir_name());
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(key.dir_name());
        std::fs::create_dir_all(&dir).unwrap();
        let names = ["meta.json", "block4_pool.npy", "gap.npy", "label.npy"];
        for (i, n) in names.iter().enumerate() {
            let bytes = std::fs::read(good_dir.join(n)).unwrap();
            let b = if i == file { apply(&bytes, &d) } else { bytes };
            let mut f = std::fs::File::create(dir.join(n)).unwrap();
            f.write_all(&b).unwrap();
        }
        if let Ok(Some(c)) = cache::open(&dir, key, data) {
            // Served: then it is the cache as built.
            let all: Vec<usize> = (0..12).collect();
            let b4 = c.block4(&all);
            let good: Vec<f32> = good_b4[good_b4.len() - b4.len() * 4..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            prop_assert_eq!(b4.as_slice().unwrap(), &good[..]);
        }
    }
}
