//! The activation cache: hit, prefix serving, resume after interruption,
//! damage and truncation detection, key separation, f16 storage.

mod common;
use common::*;
use std::path::Path;
use vgg16_cpu::data::cifar::{self, Dataset, Split};
use vgg16_cpu::features::cache::{self, CacheKey, Dtype, Meta, Outcome};
use vgg16_cpu::model::vgg::Vgg16;

fn setup() -> (Vgg16, Dataset) {
    let src = cifar::locate(&sample_dir()).unwrap();
    (fake_vgg(9), cifar::load_split(&src, Split::Test).unwrap())
}

fn only_dir(root: &Path) -> std::path::PathBuf {
    let mut d: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(d.len(), 1, "{d:?}");
    d.pop().unwrap()
}

#[test]
fn second_open_is_a_hit_and_a_prefix_is_served() {
    let (model, data) = setup();
    let tmp = tempfile::tempdir().unwrap();
    let k = CacheKey::new(&model.digest(), 32, &data, 100, Dtype::F32);
    let (c, o) = cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    assert!(matches!(o, Outcome::Built { resumed_at: 0, .. }));
    let before = c.block4(&[7, 99]);
    let (_, o) = cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    assert_eq!(o, Outcome::Hit);
    // Records 0..40 are served by the 100-record cache, no new build.
    let k40 = CacheKey::new(&model.digest(), 32, &data, 40, Dtype::F32);
    let (c40, o) = cache::open_or_build(tmp.path(), &k40, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    assert_eq!(o, Outcome::Hit);
    assert_eq!(c40.block4(&[7]), before.slice(ndarray::s![0..1, .., .., ..]));
    let dirs = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    assert_eq!(dirs, 1, "a second cache was made");
}

#[test]
fn build_with_no_finished_chunk_is_redone_whole() {
    let (model, data) = setup();
    let tmp = tempfile::tempdir().unwrap();
    let k = CacheKey::new(&model.digest(), 32, &data, 100, Dtype::F32);
    // cache::CHUNK is 256 > 100, so make the "interruption" by hand: a cache
    // that claims no finished chunk and holds garbage must be rebuilt whole.
    let (c, _) = cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    let full = c.block4(&(0..100).collect::<Vec<_>>());
    drop(c);
    let dir = only_dir(tmp.path());
    let mp = dir.join("meta.json");
    let mut meta: Meta = serde_json::from_str(&std::fs::read_to_string(&mp).unwrap()).unwrap();
    meta.complete = false;
    meta.done = 0;
    meta.chunk_digests.clear();
    std::fs::write(&mp, serde_json::to_string(&meta).unwrap()).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("block4_pool.npy"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xAB; 4096], 200).unwrap();
    let (c, o) = cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    assert!(matches!(o, Outcome::Built { resumed_at: 0, .. }), "{o:?}");
    assert_eq!(c.block4(&(0..100).collect::<Vec<_>>()), full);
}

#[test]
fn resume_keeps_finished_chunks() {
    // 300 records = two chunks of 256 + 44: mark only the first as done.
    let src = cifar::locate(&sample_dir()).unwrap();
    let data = cifar::load_split(&src, Split::Train).unwrap();
    let model = fake_vgg(10);
    let tmp = tempfile::tempdir().unwrap();
    let k = CacheKey::new(&model.digest(), 32, &data, 300, Dtype::F16);
    let (c, _) = cache::open_or_build(tmp.path(), &k, &model, &data, 64, &mut vgg16_cpu::Silent).unwrap();
    let full = c.block4(&(0..300).collect::<Vec<_>>());
    drop(c);
    let dir = only_dir(tmp.path());
    let mp = dir.join("meta.json");
    let mut meta: Meta = serde_json::from_str(&std::fs::read_to_string(&mp).unwrap()).unwrap();
    assert_eq!(meta.chunk_digests.len(), 2);
    meta.complete = false;
    meta.done = cache::CHUNK;
    meta.chunk_digests.truncate(1);
    std::fs::write(&mp, serde_json::to_string(&meta).unwrap()).unwrap();
    let (c, o) = cache::open_or_build(tmp.path(), &k, &model, &data, 64, &mut vgg16_cpu::Silent).unwrap();
    assert!(matches!(o, Outcome::Built { resumed_at: 256, .. }), "{o:?}");
    assert_eq!(c.block4(&(0..300).collect::<Vec<_>>()), full);
}

#[test]
fn damaged_or_truncated_cache_is_rebuilt_never_used() {
    let (model, data) = setup();
    for damage in ["flip", "truncate", "meta"] {
        let tmp = tempfile::tempdir().unwrap();
        let k = CacheKey::new(&model.digest(), 32, &data, 60, Dtype::F32);
        let (c, _) = cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
        let good = c.block4(&[59]);
        drop(c);
        let dir = only_dir(tmp.path());
        let b4 = dir.join("block4_pool.npy");
        match damage {
            "flip" => {
                let mut bytes = std::fs::read(&b4).unwrap();
                let n = bytes.len();
                bytes[n - 10] ^= 0x40;
                std::fs::write(&b4, bytes).unwrap();
            }
            "truncate" => {
                let f = std::fs::OpenOptions::new().write(true).open(&b4).unwrap();
                let n = f.metadata().unwrap().len();
                f.set_len(n - 100).unwrap();
            }
            _ => std::fs::write(dir.join("meta.json"), b"{not json").unwrap(),
        }
        assert!(cache::open(&dir, &k, &data).is_err(), "{damage}: damage not detected");
        let (c, o) = cache::open_or_build(tmp.path(), &k, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
        assert!(matches!(o, Outcome::Built { .. }), "{damage}: {o:?}");
        assert_eq!(c.block4(&[59]), good, "{damage}");
    }
}

#[test]
fn different_weights_or_size_never_share_a_cache() {
    let (model, data) = setup();
    let other = fake_vgg(77);
    let tmp = tempfile::tempdir().unwrap();
    let k1 = CacheKey::new(&model.digest(), 32, &data, 20, Dtype::F32);
    let k2 = CacheKey::new(&other.digest(), 32, &data, 20, Dtype::F32);
    let k3 = CacheKey::new(&model.digest(), 64, &data, 20, Dtype::F32);
    assert_ne!(k1.id(), k2.id());
    assert_ne!(k1.id(), k3.id());
    let (c1, _) = cache::open_or_build(tmp.path(), &k1, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    let (c2, o2) = cache::open_or_build(tmp.path(), &k2, &other, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    assert!(matches!(o2, Outcome::Built { .. }));
    assert_ne!(c1.block4(&[0]), c2.block4(&[0]));
    let (c3, _) = cache::open_or_build(tmp.path(), &k3, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    assert_eq!(c3.block4(&[0]).dim(), (1, 4, 4, 512));
}

#[test]
fn f16_cache_is_close_to_f32() {
    let (model, data) = setup();
    let tmp = tempfile::tempdir().unwrap();
    let k32 = CacheKey::new(&model.digest(), 32, &data, 30, Dtype::F32);
    let k16 = CacheKey::new(&model.digest(), 32, &data, 30, Dtype::F16);
    let (a, _) = cache::open_or_build(tmp.path(), &k32, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    let (b, _) = cache::open_or_build(tmp.path(), &k16, &model, &data, 32, &mut vgg16_cpu::Silent).unwrap();
    let idx: Vec<usize> = (0..30).collect();
    let (x, y) = (a.block4(&idx), b.block4(&idx));
    let e = rel_err(y.iter(), x.mapv(|v| v as f64).iter());
    assert!(e > 0.0 && e < 1e-3, "f16 relative error {e}");
    assert_eq!(a.gap, b.gap, "GAP features stay f32");
}
