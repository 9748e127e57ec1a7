//! The CIFAR-10 reader on hand-made and malformed inputs (directory and
//! .tar.gz), and preprocessing on values worked out by hand.

mod common;
use std::io::Write;
use std::path::Path;
use vgg16_cpu::data::cifar::{self, DataError, Source, Split, RECORD_BYTES};
use vgg16_cpu::data::image::{preprocess_planar, resize_bilinear, MEANS_BGR};

const META: &str = "airplane\nautomobile\nbird\ncat\n\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n";

/// A record whose label is `label` and whose pixels encode `tag`.
fn record(label: u8, tag: u8) -> Vec<u8> {
    let mut r = vec![label];
    r.extend((0..3072).map(|i| tag.wrapping_add((i % 251) as u8)));
    r
}

/// Files of a tiny dataset: batch b (1..5) holds records tagged 10*b + j.
fn files(per_batch: usize) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("batches.meta.txt".to_string(), META.as_bytes().to_vec())];
    for b in 1..=5u8 {
        let bytes: Vec<u8> = (0..per_batch as u8)
            .flat_map(|j| record((b + j) % 10, 10 * b + j))
            .collect();
        out.push((format!("data_batch_{b}.bin"), bytes));
    }
    let test: Vec<u8> = (0..3u8).flat_map(|j| record(9 - j, 200 + j)).collect();
    out.push(("test_batch.bin".to_string(), test));
    out
}

fn write_dir(dir: &Path, files: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// A .tar.gz with the members in the given order under cifar-10-batches-bin/.
fn write_archive(path: &Path, files: &[(String, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("cifar-10-batches-bin/{name}"), bytes.as_slice())
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

#[test]
fn reads_directory_in_batch_then_record_order() {
    let tmp = tempfile::tempdir().unwrap();
    write_dir(&tmp.path().join("cifar-10-batches-bin"), &files(2));
    let src = cifar::locate(tmp.path()).unwrap();
    assert!(matches!(src, Source::Dir(_)));
    let train = cifar::load_split(&src, Split::Train).unwrap();
    assert_eq!(train.len(), 10);
    assert_eq!(train.class_names.len(), 10, "blank lines are ignored");
    assert_eq!(train.class_names[4], "deer");
    let tags: Vec<u8> = (0..10).map(|i| train.image(i)[0]).collect();
    assert_eq!(tags, vec![10, 11, 20, 21, 30, 31, 40, 41, 50, 51]);
    assert_eq!(train.labels, vec![1, 2, 2, 3, 3, 4, 4, 5, 5, 6]);
    let test = cifar::load_split(&src, Split::Test).unwrap();
    assert_eq!(test.labels, vec![9, 8, 7]);
    assert_eq!(test.image(2)[5], 207);
}

#[test]
fn reads_archive_with_members_in_any_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = files(2);
    f.reverse();
    f.insert(2, ("readme.html".to_string(), b"<html></html>".to_vec()));
    let path = tmp.path().join("cifar-10-binary.tar.gz");
    write_archive(&path, &f);
    // Both the file and its directory locate it.
    assert_eq!(cifar::locate(&path).unwrap(), Source::Archive(path.clone()));
    assert_eq!(cifar::locate(tmp.path()).unwrap(), Source::Archive(path.clone()));
    let train = cifar::load_split(&Source::Archive(path.clone()), Split::Train).unwrap();
    let tags: Vec<u8> = (0..10).map(|i| train.image(i)[0]).collect();
    assert_eq!(tags, vec![10, 11, 20, 21, 30, 31, 40, 41, 50, 51]);
}

#[test]
fn size_not_a_multiple_of_a_record_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = files(1);
    f[3].1.pop(); // data_batch_3.bin one byte short
    write_dir(tmp.path(), &f);
    let err = cifar::load_split(&cifar::locate(tmp.path()).unwrap(), Split::Train).unwrap_err();
    assert!(matches!(err, DataError::BadSize { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("data_batch_3.bin") && msg.contains(&format!("{RECORD_BYTES}")),
        "{msg}"
    );
}

#[test]
fn label_above_nine_names_file_and_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = files(3);
    f[2].1[2 * RECORD_BYTES] = 10; // data_batch_2.bin, record 2
    write_dir(tmp.path(), &f);
    let msg = cifar::load_split(&cifar::locate(tmp.path()).unwrap(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("data_batch_2.bin") && msg.contains("record 2") && msg.contains("label 10"),
        "{msg}"
    );
}

#[test]
fn missing_member_and_missing_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let f: Vec<_> = files(1).into_iter().filter(|(n, _)| n != "test_batch.bin").collect();
    write_dir(tmp.path(), &f);
    let src = cifar::locate(tmp.path()).unwrap();
    assert!(
        cifar::load_split(&src, Split::Train).is_ok(),
        "train does not need the test file"
    );
    let msg = cifar::load_split(&src, Split::Test).unwrap_err().to_string();
    assert!(msg.contains("test_batch.bin"), "{msg}");
    let empty = tempfile::tempdir().unwrap();
    let msg = cifar::locate(empty.path()).unwrap_err().to_string();
    assert!(msg.contains("vgg16 data fetch"), "{msg}");
    // In an archive, too.
    let path = tmp.path().join("a.tar.gz");
    write_archive(&path, &f);
    let msg = cifar::load_split(&Source::Archive(path), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("a.tar.gz") && msg.contains("test_batch.bin"), "{msg}");
}

#[test]
fn bad_meta_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = files(1);
    f[0].1 = b"cat\ndog\n".to_vec();
    write_dir(tmp.path(), &f);
    let msg = cifar::load_split(&cifar::locate(tmp.path()).unwrap(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("batches.meta.txt") && msg.contains("2 class names"),
        "{msg}"
    );
}

#[test]
fn truncated_or_corrupt_archive_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cifar-10-binary.tar.gz");
    write_archive(&path, &files(20));
    let bytes = std::fs::read(&path).unwrap();
    let cut = tmp.path().join("cut.tar.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = cifar::load_split(&Source::Archive(cut), Split::Test).unwrap_err();
    assert!(
        matches!(err, DataError::Archive { .. } | DataError::MissingMember { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("cut.tar.gz"), "{err}");
    let junk = tmp.path().join("junk.tar.gz");
    std::fs::write(&junk, b"this is not gzip at all, not even a little").unwrap();
    let err = cifar::load_split(&Source::Archive(junk), Split::Train).unwrap_err();
    assert!(matches!(err, DataError::Archive { .. }), "{err}");
    assert!(err.to_string().contains("junk.tar.gz"), "{err}");
}

#[test]
fn preprocessing_by_hand() {
    // Pixel 0: R=10, G=20, B=30 -> BGR minus means.
    let mut rec = vec![0u8; 3072];
    rec[0] = 10;
    rec[1024] = 20;
    rec[2048] = 30;
    let mut out = vec![0.0f32; 3072];
    preprocess_planar(&rec, 32, &mut out);
    assert_eq!(out[0], 30.0 - MEANS_BGR[0]);
    assert_eq!(out[1], 20.0 - MEANS_BGR[1]);
    assert_eq!(out[2], 10.0 - MEANS_BGR[2]);
    assert_eq!(out[3], -MEANS_BGR[0]);
}

#[test]
fn bilinear_half_pixel_by_hand() {
    // 1-D ramp [0, 10] (one channel, height 1) upsampled to 4: source
    // coordinates (o + 0.5) * 0.5 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped
    // to 0, 2.5, 7.5, 10.
    let mut out = vec![0.0f32; 4];
    resize_bilinear(&[0.0, 10.0], 1, 2, 1, 1, 4, &mut out);
    assert_eq!(out, vec![0.0, 2.5, 7.5, 10.0]);
    // Same size is a copy; 2x2 -> 1x1 averages the centre.
    let mut same = vec![0.0f32; 2];
    resize_bilinear(&[1.0, 2.0], 1, 2, 1, 1, 2, &mut same);
    assert_eq!(same, vec![1.0, 2.0]);
    let mut one = vec![0.0f32; 1];
    resize_bilinear(&[0.0, 4.0, 8.0, 12.0], 2, 2, 1, 1, 1, &mut one);
    assert_eq!(one, vec![6.0]);
}
