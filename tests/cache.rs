//! The activation cache: hit, prefix serving, resume after interruption,
//! damage and truncation detection, key separation, f16 storage.

mod common;
use common::*;
use std::path::Path;
use vgg16_cpu::data::cifar::{self, Dataset, Split};
use vgg16_cpu::features::cache::{self, CacheKey, Dtype, Meta, Outcome, Shard, ShardOutcome};
use vgg16_cpu::model::vgg::Vgg16;
use vgg16_cpu::Silent;

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

/// Counts the records a build computed (its progress advances).
#[derive(Default)]
struct Count(u64);
impl vgg16_cpu::Observer for Count {
    fn advance(&mut self, n: u64, _msg: &str) {
        self.0 += n;
    }
}

fn same_files(a: &Path, b: &Path) {
    for f in ["block4_pool.npy", "gap.npy", "label.npy"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
    let (ma, mb) = (meta_of(a), meta_of(b));
    assert_eq!(ma.chunk_digests, mb.chunk_digests);
    assert_eq!((ma.gap_digest, ma.label_digest), (mb.gap_digest, mb.label_digest));
    assert!(ma.complete && mb.complete);
}

fn setup_train() -> (Vgg16, Dataset) {
    let src = cifar::locate(&sample_dir()).unwrap();
    (fake_vgg(9), cifar::load_split(&src, Split::Train).unwrap())
}

fn meta_of(dir: &Path) -> Meta {
    serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap()
}

#[test]
fn shards_build_the_bytes_one_process_builds_and_the_last_seals() {
    let (model, data) = setup_train();
    // 500 records: chunks of 256 and 244; shards of 2 and 3 (one idle).
    let n = 500;
    let k = CacheKey::new(&model.digest(), 32, &data, n, Dtype::F32);
    let serial = tempfile::tempdir().unwrap();
    cache::open_or_build(serial.path(), &k, &model, &data, 7, &mut Silent).unwrap();
    let want = serial.path().join(k.dir_name());
    for count in [2usize, 3] {
        let tmp = tempfile::tempdir().unwrap();
        // Shards in reverse order, and each resumed once it is done.
        for index in (0..count).rev() {
            let shard = Shard { index, count };
            let mut c = Count::default();
            let out = cache::build_shard(tmp.path(), &k, &model, &data, 7, shard, &mut c).unwrap();
            let chunks: Vec<usize> = (0..2).filter(|&ch| shard.owns(ch)).collect();
            let records: usize = chunks.iter().map(|&ch| (ch * 256 + 256).min(n) - ch * 256).sum();
            assert_eq!(c.0 as usize, records, "shard {shard} computed its own chunks only");
            if index > 0 {
                let missing = (0..2).filter(|&ch| ch % count < index).count();
                assert_eq!(out, ShardOutcome::Waiting { missing }, "shard {shard}");
                assert!(cache::find(tmp.path(), &k).is_none(), "not usable before it is sealed");
            } else {
                assert_eq!(out, ShardOutcome::Complete, "the last shard seals");
            }
        }
        let got = tmp.path().join(k.dir_name());
        same_files(&got, &want);
        assert!(!got.join("shards").exists(), "shard progress removed once sealed");
        let (_, o) = cache::open_or_build(tmp.path(), &k, &model, &data, 7, &mut Silent).unwrap();
        assert_eq!(o, Outcome::Hit);
    }
}

#[test]
fn an_interrupted_shard_resumes_and_a_serial_build_reuses_shards() {
    let (model, data) = setup_train();
    let n = 500;
    let k = CacheKey::new(&model.digest(), 32, &data, n, Dtype::F32);
    let tmp = tempfile::tempdir().unwrap();
    let shard = Shard { index: 0, count: 2 };
    cache::build_shard(tmp.path(), &k, &model, &data, 7, shard, &mut Silent).unwrap();
    // Run again: its recorded chunk is not redone.
    let mut c = Count::default();
    cache::build_shard(tmp.path(), &k, &model, &data, 7, shard, &mut c).unwrap();
    assert_eq!(c.0, 0, "a finished shard resumes with nothing to do");
    // As if killed before chunk 0 was recorded: its progress forgets it.
    let prog = tmp.path().join(k.dir_name()).join("shards/0-of-2.json");
    let mut p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&prog).unwrap()).unwrap();
    p["chunks"].as_object_mut().unwrap().remove("0");
    std::fs::write(&prog, serde_json::to_vec(&p).unwrap()).unwrap();
    let mut c = Count::default();
    cache::build_shard(tmp.path(), &k, &model, &data, 7, shard, &mut c).unwrap();
    assert_eq!(c.0, 256, "the unrecorded chunk (records 0..256) reruns");
    // A single process finishes the rest (chunk 1) and takes chunk 0 as
    // the shard left it.
    let mut c = Count::default();
    let (_, o) = cache::open_or_build(tmp.path(), &k, &model, &data, 7, &mut c).unwrap();
    assert!(matches!(o, Outcome::Built { .. }));
    assert_eq!(c.0, 244);
    let serial = tempfile::tempdir().unwrap();
    cache::open_or_build(serial.path(), &k, &model, &data, 7, &mut Silent).unwrap();
    same_files(&tmp.path().join(k.dir_name()), &serial.path().join(k.dir_name()));
}

#[test]
fn shards_from_node_local_disks_merge_and_bad_bytes_are_caught() {
    let (model, data) = setup_train();
    let n = 500;
    let k = CacheKey::new(&model.digest(), 32, &data, n, Dtype::F32);
    let (a, b, into) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    for (dir, index) in [(&a, 0), (&b, 1)] {
        let out = cache::build_shard(dir.path(), &k, &model, &data, 7, Shard { index, count: 2 }, &mut Silent).unwrap();
        assert!(matches!(out, ShardOutcome::Waiting { .. }));
    }
    let sources = [a.path().join(k.dir_name()), b.path().join(k.dir_name())];
    // One source alone: merged but not complete.
    let (key, out) = cache::merge(into.path(), &sources[..1], &mut Silent).unwrap();
    assert_eq!(
        (key.dir_name(), out),
        (k.dir_name(), ShardOutcome::Waiting { missing: 1 })
    );
    let (_, out) = cache::merge(into.path(), &sources, &mut Silent).unwrap();
    assert_eq!(out, ShardOutcome::Complete);
    let serial = tempfile::tempdir().unwrap();
    cache::open_or_build(serial.path(), &k, &model, &data, 7, &mut Silent).unwrap();
    same_files(&into.path().join(k.dir_name()), &serial.path().join(k.dir_name()));

    // A damaged shard's bytes are refused when sealing, naming the file.
    let bad = tempfile::tempdir().unwrap();
    let b4 = sources[1].join("block4_pool.npy");
    let mut bytes = std::fs::read(&b4).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x40;
    std::fs::write(&b4, bytes).unwrap();
    let e = cache::merge(bad.path(), &sources, &mut Silent).unwrap_err().to_string();
    assert!(e.contains("block4_pool.npy") && e.contains("do not match"), "{e}");
    // Not a shard directory: named.
    let e = cache::merge(bad.path(), &[serial.path().to_path_buf()], &mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&serial.path().display().to_string()), "{e}");
}

#[test]
fn shard_specs_are_checked() {
    assert_eq!(Shard::parse("1/4").unwrap(), Shard { index: 1, count: 4 });
    for bad in ["4/4", "0/0", "1", "a/2", "-1/2", "1/2/3", ""] {
        let e = Shard::parse(bad).unwrap_err().to_string();
        assert!(e.contains("--shard") && e.contains(bad), "{bad}: {e}");
    }
}
