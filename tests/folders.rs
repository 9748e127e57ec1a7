//! Image-folder datasets and CIFAR-100, on data built here on the fly:
//! PNG and JPEG of mixed sizes, grayscale / RGBA / 16-bit images, a
//! corrupt file, a non-image, hidden files and folders, class names with
//! spaces and non-ASCII letters; then labels, counts, splits, the cache
//! key, decoding by hand, and the whole job (train, evaluate, predict) on
//! a folder.

mod common;
use common::*;
use image::{ImageBuffer, Luma, Rgb, RgbImage, Rgba};
use std::path::{Path, PathBuf};
use vgg16_cpu::data::cifar::{self, Kind, LabelMode};
use vgg16_cpu::data::folder::{image_files, stratified_pick, Folder, FolderOptions, Layout};
use vgg16_cpu::data::image::{center_square, decode_rgb, load_resized_into, MEANS_BGR};
use vgg16_cpu::data::{locate, DataOptions, DataSource, DatasetKind, Records, Resize, Split};
use vgg16_cpu::features::cache::CacheKey;

fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

fn save_png(p: &Path, img: &RgbImage) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    img.save_with_format(p, image::ImageFormat::Png).unwrap();
}

fn save_jpg(p: &Path, img: &RgbImage) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = std::fs::File::create(p).unwrap();
    image::codecs::jpeg::JpegEncoder::new_with_quality(f, 95)
        .encode_image(img)
        .unwrap();
}

/// The classes of the hand-made folder, in the order Keras gives them
/// (sorted by bytes: upper case before lower, ASCII before accents).
const CLASSES: [&str; 3] = ["Zebra", "sea lion", "éclair"];

/// Class folders under `dir`: per class `n` good images (PNG and JPEG
/// alternating, sizes varying), plus the oddities named in the module docs.
/// Returns how many good images each class got.
fn make_flat(dir: &Path, n: [usize; 3]) -> [usize; 3] {
    for (c, class) in CLASSES.iter().enumerate() {
        for i in 0..n[c] {
            let img = solid(20 + 7 * i as u32, 15 + 3 * c as u32, [40 * c as u8, 7 * i as u8, 200]);
            let p = dir.join(class).join(format!("img {i:03}"));
            if i % 2 == 0 {
                save_png(&p.with_extension("png"), &img);
            } else {
                save_jpg(&p.with_extension("JPG"), &img);
            }
        }
    }
    let z = dir.join("Zebra");
    // Grayscale, RGBA and 16-bit PNGs are images too (counted as good).
    ImageBuffer::<Luma<u8>, Vec<u8>>::from_pixel(9, 9, Luma([77]))
        .save(z.join("gray.png"))
        .unwrap();
    ImageBuffer::<Rgba<u8>, Vec<u8>>::from_pixel(9, 9, Rgba([1, 2, 3, 0]))
        .save(z.join("rgba.png"))
        .unwrap();
    ImageBuffer::<Rgb<u16>, Vec<u16>>::from_pixel(9, 9, Rgb([65535, 0, 257]))
        .save(z.join("deep.png"))
        .unwrap();
    // In a nested folder: still the class's.
    save_png(&z.join("nested/deeper/n.png"), &solid(5, 5, [1, 1, 1]));
    // Not counted as images.
    std::fs::write(z.join("corrupt.jpg"), b"this is not a jpeg").unwrap();
    std::fs::write(z.join("notes.txt"), b"hello").unwrap();
    std::fs::write(z.join(".DS_Store"), b"x").unwrap();
    save_png(&z.join(".hidden/h.png"), &solid(5, 5, [1, 1, 1]));
    std::fs::write(dir.join("README.txt"), b"loose").unwrap();
    // A hidden folder at the top is not a class.
    std::fs::create_dir_all(dir.join(".cache")).unwrap();
    [n[0] + 4, n[1], n[2]]
}

#[test]
fn flat_folder_classes_labels_counts_and_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let good = make_flat(tmp.path(), [6, 5, 4]);
    let f = Folder::scan(tmp.path(), &FolderOptions::default()).unwrap();
    assert_eq!(f.class_names, CLASSES);
    assert_eq!(f.train.len() + f.test.len(), good.iter().sum::<usize>());
    for c in 0..3 {
        let n = f.train.iter().chain(&f.test).filter(|e| e.label as usize == c).count();
        assert_eq!(n, good[c], "class {}", CLASSES[c]);
        // Every file of class c sits under its folder.
        assert!(f
            .train
            .iter()
            .chain(&f.test)
            .filter(|e| e.label as usize == c)
            .all(|e| e.rel.starts_with(CLASSES[c])));
    }
    assert_eq!(f.skipped.unreadable.len(), 1, "{:?}", f.skipped);
    assert!(f.skipped.unreadable[0].0.ends_with("corrupt.jpg"));
    assert_eq!(f.skipped.not_images, 1, "notes.txt");
    assert_eq!(f.skipped.hidden, 2, ".DS_Store and .hidden/");
    assert_eq!(f.skipped.loose, 1, "README.txt");
    let line = f.skipped_summary().unwrap();
    assert!(line.contains("1 unreadable") && line.contains("1 non-image"), "{line}");
    // Default test split 0.2, stratified: round(0.2 n) per class.
    for (c, &n) in good.iter().enumerate() {
        let t = f.test.iter().filter(|e| e.label as usize == c).count();
        assert_eq!(t, ((n as f64) * 0.2).round() as usize, "class {c}");
    }
    // strict: the corrupt file is an error naming it.
    let e = Folder::scan(
        tmp.path(),
        &FolderOptions {
            strict: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("corrupt.jpg") && e.contains("--strict"), "{e}");
}

#[test]
fn split_layout_with_test_or_val_folder() {
    for test_name in ["test", "val", "validation"] {
        let tmp = tempfile::tempdir().unwrap();
        make_flat(&tmp.path().join("train"), [3, 3, 3]);
        for (c, class) in CLASSES.iter().enumerate().take(2) {
            save_png(
                &tmp.path().join(test_name).join(class).join("t.png"),
                &solid(8, 8, [c as u8, 0, 0]),
            );
        }
        let f = Folder::scan(tmp.path(), &FolderOptions::default()).unwrap();
        assert_eq!(
            f.layout,
            Layout::Split {
                train: "train".into(),
                test: test_name.into(),
                val: None
            }
        );
        assert_eq!(f.class_names, CLASSES, "classes come from train/");
        assert_eq!(f.train.len(), 3 + 4 + 3 + 3);
        assert_eq!(f.test.len(), 2);
        let ds = f.dataset(Split::Test);
        let mut labels = ds.labels.clone();
        labels.sort();
        assert_eq!(labels, [0, 1]);
    }
    // A test class that train/ lacks is named.
    let tmp = tempfile::tempdir().unwrap();
    make_flat(&tmp.path().join("train"), [2, 2, 2]);
    save_png(&tmp.path().join("test/zzz/t.png"), &solid(8, 8, [0, 0, 0]));
    let e = Folder::scan(tmp.path(), &FolderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("'zzz'") && e.contains("not in train/"), "{e}");
    // train/ alone: told what is missing.
    std::fs::remove_dir_all(tmp.path().join("test")).unwrap();
    let e = Folder::scan(tmp.path(), &FolderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no test/, val/ or validation/"), "{e}");
    // --test-split with its own test folder is refused, not ignored.
    save_png(&tmp.path().join("test/Zebra/t.png"), &solid(8, 8, [0, 0, 0]));
    let e = Folder::scan(
        tmp.path(),
        &FolderOptions {
            test_split: Some(0.3),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--test-split"), "{e}");
}

#[test]
fn fewer_than_two_classes_or_no_images_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    save_png(&tmp.path().join("only/a.png"), &solid(4, 4, [0, 0, 0]));
    let e = Folder::scan(tmp.path(), &FolderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 class folder(s)"), "{e}");
    std::fs::create_dir_all(tmp.path().join("empty")).unwrap();
    std::fs::write(tmp.path().join("only/a.png"), b"garbage").unwrap();
    let e = Folder::scan(tmp.path(), &FolderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no readable training images"), "{e}");
}

#[test]
fn flat_split_is_seeded_stratified_and_stable_when_other_classes_grow() {
    let tmp = tempfile::tempdir().unwrap();
    make_flat(tmp.path(), [20, 20, 20]);
    let opts = |seed| FolderOptions {
        test_split: Some(0.25),
        split_seed: seed,
        ..Default::default()
    };
    let a = Folder::scan(tmp.path(), &opts(1)).unwrap();
    let b = Folder::scan(tmp.path(), &opts(2)).unwrap();
    let again = Folder::scan(tmp.path(), &opts(1)).unwrap();
    assert_eq!(a.test, again.test, "same seed, same split");
    assert_ne!(a.test, b.test, "another seed, another split");
    for c in 0..3u8 {
        let want = if c == 0 { 6 } else { 5 }; // round(0.25 * 24), round(0.25 * 20)
        assert_eq!(a.test.iter().filter(|e| e.label == c).count(), want);
    }
    // Files added to "éclair" leave the other classes' test files alone.
    for i in 0..9 {
        save_png(
            &tmp.path().join("éclair").join(format!("new{i}.png")),
            &solid(6, 6, [9, 9, 9]),
        );
    }
    let grown = Folder::scan(tmp.path(), &opts(1)).unwrap();
    let of = |f: &Folder, c: u8| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = f.test.iter().filter(|e| e.label == c).map(|e| e.rel.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(of(&a, 0), of(&grown, 0));
    assert_eq!(of(&a, 1), of(&grown, 1));
    assert_eq!(of(&grown, 2).len(), 7, "round(0.25 * 29)");
    // The record order mixes classes, so a --limit-train prefix does too.
    let first: std::collections::BTreeSet<u8> = a.train.iter().take(12).map(|e| e.label).collect();
    assert_eq!(first.len(), 3, "{first:?}");
}

#[test]
fn validation_split_of_a_folder_is_stratified() {
    let labels: Vec<u8> = (0..100).map(|i| (i % 4) as u8).collect();
    let keys: Vec<u64> = (0..100u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let picked = stratified_pick(&labels, &keys, 0.2);
    for c in 0..4u8 {
        let n = (0..100).filter(|&i| picked[i] && labels[i] == c).count();
        assert_eq!(n, 5, "class {c}");
    }
    // Through the dataset: disjoint, complete, per-class round(f n).
    let tmp = tempfile::tempdir().unwrap();
    make_flat(tmp.path(), [10, 10, 10]);
    let ds = Folder::scan(tmp.path(), &FolderOptions::default())
        .unwrap()
        .dataset(Split::Train);
    let (tr, val) = ds.validation_split(ds.len(), 0.25);
    assert_eq!(tr.len() + val.len(), ds.len());
    let mut all: Vec<usize> = tr.iter().chain(&val).copied().collect();
    all.sort();
    assert_eq!(all, (0..ds.len()).collect::<Vec<_>>());
    for c in 0..3u8 {
        let n_c = ds.labels.iter().filter(|&&l| l == c).count();
        let v_c = val.iter().filter(|&&i| ds.labels[i] == c).count();
        assert_eq!(v_c, ((n_c as f64) * 0.25).round() as usize, "class {c}");
    }
}

#[test]
fn cache_key_follows_the_file_list_and_resize_policy() {
    let tmp = tempfile::tempdir().unwrap();
    make_flat(tmp.path(), [4, 4, 4]);
    // The key of the split the changed file is in (a file added to one
    // split leaves the other's key, and cache, alone).
    let key_of = |opts: &FolderOptions, file: Option<&str>| {
        let f = Folder::scan(tmp.path(), opts).unwrap();
        let in_test = file.is_some_and(|n| f.test.iter().any(|e| e.rel.ends_with(n)));
        let ds = f.dataset(if in_test { Split::Test } else { Split::Train });
        CacheKey::new(
            &"0".repeat(64),
            32,
            &ds,
            ds.len(),
            vgg16_cpu::features::cache::Dtype::F32,
        )
    };
    let key = |opts: &FolderOptions| key_of(opts, None);
    let base = FolderOptions::default();
    let k0 = key(&base);
    assert_eq!(k0, key(&base), "a rescan gives the same key");
    assert_eq!(k0.resize.as_deref(), Some("stretch"));
    let crop = key(&FolderOptions {
        resize: Resize::CenterCrop,
        ..base.clone()
    });
    assert_ne!(k0.dataset_digest, crop.dataset_digest);
    assert_eq!(crop.resize.as_deref(), Some("center-crop"));
    // A file changed (content and modification time) -> another key.
    let victim = tmp.path().join("sea lion/img 000.png");
    let before = key_of(&base, Some("sea lion/img 000.png"));
    save_png(&victim, &solid(33, 21, [1, 2, 3]));
    let f = std::fs::File::options().write(true).open(&victim).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();
    assert_ne!(before.id(), key_of(&base, Some("sea lion/img 000.png")).id());
    // A file added -> another key for its split.
    let name = "Zebra/extra.png";
    save_png(&tmp.path().join(name), &solid(8, 8, [0, 0, 0]));
    let after = key_of(&base, Some(name));
    std::fs::remove_file(tmp.path().join(name)).unwrap();
    let without = {
        let f = Folder::scan(tmp.path(), &base).unwrap();
        let split = if after.split == "test" {
            Split::Test
        } else {
            Split::Train
        };
        let ds = f.dataset(split);
        CacheKey::new(
            &"0".repeat(64),
            32,
            &ds,
            ds.len(),
            vgg16_cpu::features::cache::Dtype::F32,
        )
    };
    assert_ne!(after.id(), without.id());
    // CIFAR keys keep their shape (no resize field), so old caches stay valid.
    let cifar_ds = cifar::load_split(&cifar::locate(&sample_dir()).unwrap(), Split::Test).unwrap();
    let ck = CacheKey::new(
        &"0".repeat(64),
        32,
        &cifar_ds,
        10,
        vgg16_cpu::features::cache::Dtype::F32,
    );
    assert!(ck.resize.is_none());
    assert!(!serde_json::to_string(&ck).unwrap().contains("\"resize\""));
}

#[test]
fn decoding_converts_every_pixel_format_to_rgb_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ImageBuffer::<Luma<u8>, Vec<u8>>::from_pixel(3, 2, Luma([77]))
        .save(d.join("g.png"))
        .unwrap();
    ImageBuffer::<Rgba<u8>, Vec<u8>>::from_pixel(3, 2, Rgba([10, 20, 30, 0]))
        .save(d.join("a.png"))
        .unwrap();
    ImageBuffer::<Rgb<u16>, Vec<u16>>::from_pixel(3, 2, Rgb([65535, 0, 257 * 100]))
        .save(d.join("d.png"))
        .unwrap();
    solid(3, 2, [5, 6, 7]).save(d.join("b.bmp")).unwrap();
    let px = |f: &str| *decode_rgb(&d.join(f)).unwrap().get_pixel(1, 1);
    assert_eq!(px("g.png"), Rgb([77, 77, 77]));
    assert_eq!(px("a.png"), Rgb([10, 20, 30]), "alpha dropped");
    assert_eq!(px("d.png"), Rgb([255, 0, 100]), "16 bit scaled to 8");
    assert_eq!(px("b.bmp"), Rgb([5, 6, 7]));
    // A solid image resized to any S is that colour, BGR minus the means.
    let mut out = vec![0.0f32; 5 * 5 * 3];
    load_resized_into(&d.join("b.bmp"), Resize::Stretch, 5, &mut out).unwrap();
    for p in out.chunks(3) {
        assert_eq!(p, [7.0 - MEANS_BGR[0], 6.0 - MEANS_BGR[1], 5.0 - MEANS_BGR[2]]);
    }
    // A non-image is an error naming the file.
    std::fs::write(d.join("x.png"), b"nope").unwrap();
    let e = decode_rgb(&d.join("x.png")).unwrap_err().to_string();
    assert!(e.contains("x.png") && e.contains("not a readable"), "{e}");
}

/// A JPEG with an EXIF APP1 segment holding only the orientation tag.
fn jpeg_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 95)
        .encode_image(img)
        .unwrap();
    // TIFF, little endian: header, one IFD with one SHORT entry (0x0112).
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend(1u16.to_le_bytes());
    tiff.extend(0x0112u16.to_le_bytes());
    tiff.extend(3u16.to_le_bytes());
    tiff.extend(1u32.to_le_bytes());
    tiff.extend(orientation.to_le_bytes());
    tiff.extend([0, 0]);
    tiff.extend(0u32.to_le_bytes());
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let mut seg = vec![0xFF, 0xE1];
    seg.extend(((app1.len() + 2) as u16).to_be_bytes());
    seg.extend(app1);
    let mut out = jpg[..2].to_vec(); // SOI
    out.extend(seg);
    out.extend(&jpg[2..]);
    out
}

#[test]
fn exif_orientation_is_applied() {
    let tmp = tempfile::tempdir().unwrap();
    // 16 wide, 8 high: left half red, right half blue.
    let img = RgbImage::from_fn(16, 8, |x, _| if x < 8 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
    let plain = tmp.path().join("plain.jpg");
    std::fs::write(&plain, jpeg_with_orientation(&img, 1)).unwrap();
    assert_eq!(decode_rgb(&plain).unwrap().dimensions(), (16, 8));
    // 6 = rotate 90 degrees clockwise to display: 8 wide, 16 high, red on top.
    let rotated = tmp.path().join("rot.jpg");
    std::fs::write(&rotated, jpeg_with_orientation(&img, 6)).unwrap();
    let r = decode_rgb(&rotated).unwrap();
    assert_eq!(r.dimensions(), (8, 16));
    let (top, bottom) = (r.get_pixel(4, 2), r.get_pixel(4, 13));
    assert!(top[0] > 200 && top[2] < 60, "top {top:?}");
    assert!(bottom[2] > 200 && bottom[0] < 60, "bottom {bottom:?}");
}

#[test]
fn center_crop_keeps_the_middle_square() {
    // 30 x 10: red bands 10 wide either side of a blue 10 x 10 centre.
    let img = RgbImage::from_fn(30, 10, |x, _| {
        if (10..20).contains(&x) {
            Rgb([0, 0, 255])
        } else {
            Rgb([255, 0, 0])
        }
    });
    let sq = center_square(&img);
    assert_eq!(sq.dimensions(), (10, 10));
    assert!(sq.pixels().all(|p| *p == Rgb([0, 0, 255])));
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("wide.png");
    img.save(&p).unwrap();
    let (mut crop, mut stretch) = (vec![0.0f32; 4 * 4 * 3], vec![0.0f32; 4 * 4 * 3]);
    load_resized_into(&p, Resize::CenterCrop, 4, &mut crop).unwrap();
    load_resized_into(&p, Resize::Stretch, 4, &mut stretch).unwrap();
    let blue = [255.0 - MEANS_BGR[0], -MEANS_BGR[1], -MEANS_BGR[2]];
    assert!(crop.chunks(3).all(|px| px == blue), "all blue after the crop");
    // Stretched, the first column samples the red band.
    assert_eq!(&stretch[..3], &[-MEANS_BGR[0], -MEANS_BGR[1], 255.0 - MEANS_BGR[2]]);
}

#[test]
fn dataset_input_decodes_each_file_and_names_a_bad_one() {
    let tmp = tempfile::tempdir().unwrap();
    make_flat(tmp.path(), [3, 3, 3]);
    let ds = Folder::scan(tmp.path(), &FolderOptions::default())
        .unwrap()
        .dataset(Split::Train);
    let Records::Files(r) = &ds.records else {
        panic!("a folder dataset has file records")
    };
    let idx: Vec<usize> = (0..ds.len()).collect();
    let x = ds.input(&idx, 8).unwrap();
    assert_eq!(x.dim(), (ds.len(), 8, 8, 3));
    // Row i is exactly file i loaded on its own.
    for (i, f) in r.files.iter().enumerate() {
        let mut one = vec![0.0f32; 8 * 8 * 3];
        load_resized_into(f, Resize::Stretch, 8, &mut one).unwrap();
        assert_eq!(
            x.slice(ndarray::s![i, .., .., ..]).iter().copied().collect::<Vec<_>>(),
            one
        );
    }
    // A file damaged after the scan: the batch fails naming it.
    std::fs::write(&r.files[2], b"damaged").unwrap();
    let e = ds.input(&idx, 8).unwrap_err().to_string();
    assert!(e.contains(&r.files[2].display().to_string()), "{e}");
}

#[test]
fn image_files_walks_folders_and_takes_files_as_given() {
    let tmp = tempfile::tempdir().unwrap();
    make_flat(tmp.path(), [2, 1, 1]);
    let (files, others) = image_files(&[tmp.path().join("Zebra"), tmp.path().join("README.txt")]).unwrap();
    // Zebra: 2 good + gray, rgba, deep, nested + corrupt.jpg (by name) = 7;
    // README.txt given by name is taken as it is.
    assert_eq!(files.len(), 8, "{files:?}");
    assert_eq!(others, 1, "notes.txt");
    assert!(files
        .iter()
        .all(|f| !f.strip_prefix(tmp.path()).unwrap().to_string_lossy().contains("/.")));
    let mut sorted = files[..7].to_vec();
    sorted.sort();
    assert_eq!(sorted, files[..7], "walk order is sorted");
}

#[test]
fn locate_tells_cifar10_cifar100_and_folders_apart() {
    let tmp = tempfile::tempdir().unwrap();
    make_flat(&tmp.path().join("photos"), [2, 2, 2]);
    let auto = DataOptions::default();
    assert!(matches!(
        locate(&tmp.path().join("photos"), &auto).unwrap(),
        DataSource::Folder(_)
    ));
    assert!(matches!(
        locate(&sample_dir(), &auto).unwrap(),
        DataSource::Cifar {
            kind: Kind::Cifar10,
            ..
        }
    ));
    let c100 = tmp.path().join("c100");
    write_cifar100(&c100, 7, 3);
    match locate(&c100, &auto).unwrap() {
        DataSource::Cifar { kind, .. } => assert_eq!(kind, Kind::Cifar100(LabelMode::Fine)),
        _ => panic!("CIFAR-100 directory not recognised"),
    }
    let archive = tmp.path().join("cifar-100-binary.tar.gz");
    write_cifar100_archive(&c100, &archive);
    assert_eq!(cifar::sniff_archive(&archive), Some(Kind::Cifar100(LabelMode::Fine)));
    let coarse = DataOptions {
        label_mode: LabelMode::Coarse,
        ..auto.clone()
    };
    match locate(&archive, &coarse).unwrap() {
        DataSource::Cifar { kind, .. } => assert_eq!(kind, Kind::Cifar100(LabelMode::Coarse)),
        _ => panic!("CIFAR-100 archive not recognised"),
    }
    // Nothing there: the message names what was looked for.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = locate(&empty, &auto).unwrap_err().to_string();
    assert!(
        e.contains("cifar-100-binary.tar.gz") && e.contains("image folder"),
        "{e}"
    );
    let e = locate(
        &empty,
        &DataOptions {
            kind: DatasetKind::Cifar100,
            ..auto
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no CIFAR-100") && e.contains("--dataset cifar100"), "{e}");
}

/// CIFAR-100 records: coarse label i % 20, fine label (3 i) % 100, image
/// bytes tagged by the record number.
fn c100_records(n: usize, salt: u8) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push((i % 20) as u8);
        v.push(((3 * i) % 100) as u8);
        v.extend(std::iter::repeat_n((i as u8).wrapping_add(salt), 3072));
    }
    v
}

fn write_cifar100(dir: &Path, n_train: usize, n_test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("train.bin"), c100_records(n_train, 0)).unwrap();
    std::fs::write(dir.join("test.bin"), c100_records(n_test, 100)).unwrap();
    let fine: Vec<String> = (0..100).map(|i| format!("fine_{i}")).collect();
    let coarse: Vec<String> = (0..20).map(|i| format!("coarse_{i}")).collect();
    std::fs::write(dir.join("fine_label_names.txt"), fine.join("\n")).unwrap();
    std::fs::write(dir.join("coarse_label_names.txt"), coarse.join("\n") + "\n").unwrap();
}

fn write_cifar100_archive(dir: &Path, archive: &Path) {
    let f = std::fs::File::create(archive).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for name in [
        "fine_label_names.txt",
        "coarse_label_names.txt",
        "train.bin",
        "test.bin",
    ] {
        tar.append_path_with_name(dir.join(name), format!("cifar-100-binary/{name}"))
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

#[test]
fn cifar100_fine_and_coarse_labels_and_class_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-100-binary");
    write_cifar100(&dir, 25, 4);
    let archive = tmp.path().join("a.tar.gz");
    write_cifar100_archive(&dir, &archive);
    for at in [cifar::Source::Dir(dir.clone()), cifar::Source::Archive(archive)] {
        let fine = cifar::load(&at, Kind::Cifar100(LabelMode::Fine), Split::Train).unwrap();
        assert_eq!(fine.len(), 25);
        assert_eq!(fine.class_names.len(), 100);
        assert_eq!(fine.class_names[42], "fine_42");
        assert_eq!(fine.labels[7], 21);
        assert_eq!(fine.image(7)[0], 7);
        assert_eq!(fine.image(7).len(), 3072);
        let coarse = cifar::load(&at, Kind::Cifar100(LabelMode::Coarse), Split::Test).unwrap();
        assert_eq!(coarse.class_names.len(), 20);
        assert_eq!(coarse.labels, [0, 1, 2, 3]);
        assert_eq!(coarse.image(2)[100], 102);
    }
    // A fine label of 100 names file and record.
    let mut bad = c100_records(3, 0);
    bad[3074 + 1] = 100;
    std::fs::write(dir.join("train.bin"), &bad).unwrap();
    let e = cifar::load(
        &cifar::Source::Dir(dir.clone()),
        Kind::Cifar100(LabelMode::Fine),
        Split::Train,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("train.bin") && e.contains("record 1") && e.contains("0..99"),
        "{e}"
    );
    // 3,073-byte records (CIFAR-10's) are not a whole number of 3,074.
    std::fs::write(dir.join("train.bin"), vec![0u8; 3073 * 2]).unwrap();
    let e = cifar::load(
        &cifar::Source::Dir(dir.clone()),
        Kind::Cifar100(LabelMode::Fine),
        Split::Train,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("3074-byte records"), "{e}");
    // A names file with 99 lines.
    std::fs::write(dir.join("train.bin"), c100_records(3, 0)).unwrap();
    let names: Vec<String> = (0..99).map(|i| format!("f{i}")).collect();
    std::fs::write(dir.join("fine_label_names.txt"), names.join("\n")).unwrap();
    let e = cifar::load(&cifar::Source::Dir(dir), Kind::Cifar100(LabelMode::Fine), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("99 class names, expected 100"), "{e}");
}

#[test]
fn top5_accuracy_and_a_report_of_many_classes() {
    use vgg16_cpu::report::metrics::{report, top_k_accuracy};
    // 3 records, 25 classes; logits rank the classes 0 > 1 > 2 > ...
    let logits = ndarray::Array2::from_shape_fn((3, 25), |(_, c)| -(c as f32));
    assert_eq!(top_k_accuracy(&logits, &[0, 4, 5], 5), 2.0 / 3.0);
    assert_eq!(top_k_accuracy(&logits, &[0, 4, 5], 1), 1.0 / 3.0);
    // Ties rank the lower class first, as argmax does.
    let flat = ndarray::Array2::<f32>::zeros((2, 25));
    assert_eq!(top_k_accuracy(&flat, &[4, 5], 5), 0.5);
    let names: Vec<String> = (0..25).map(|i| format!("c{i}")).collect();
    let r = report(&logits, &[0, 4, 5], &names);
    let t = r.top_k.as_ref().expect("top-5 for >= 20 classes");
    assert_eq!((t.k, t.accuracy), (5, 2.0 / 3.0));
    let text = r.text();
    assert!(text.contains("top-5 accuracy: 0.6667"), "{text}");
    assert!(text.contains("25 x 25 (in the JSON report and the plot)"), "{text}");
    // 10 classes: no top-k, the matrix in the text.
    let r10 = report(
        &logits.slice(ndarray::s![.., ..10]).to_owned(),
        &[0, 4, 5],
        &names[..10],
    );
    assert!(r10.top_k.is_none());
    assert!(r10.text().contains("confusion matrix (rows"));
    assert!(!serde_json::to_string(&r10).unwrap().contains("top_k"));
    // The 100-class plot renders (colour bar, no per-cell numbers).
    let names: Vec<String> = (0..100).map(|i| format!("class number {i}")).collect();
    let cm: Vec<Vec<usize>> = (0..100)
        .map(|r| (0..100).map(|c| usize::from(r == c) * 3 + (r + c) % 2).collect())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("cm.png");
    vgg16_cpu::report::plots::plot_confusion(&cm, &names, "100 classes", &p).unwrap();
    let img = image::open(&p).unwrap();
    assert_eq!((img.width(), img.height()), (1560, 1400));
}

#[test]
fn the_job_runs_on_a_folder_then_evaluate_and_predict_use_its_resize() {
    use vgg16_cpu::model::saved::SavedModel;
    use vgg16_cpu::{EvaluateJob, PredictJob, Silent, TrainJob};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("photos");
    make_flat(&root, [12, 12, 12]);
    let opts = DataOptions {
        folder: FolderOptions {
            resize: Resize::CenterCrop,
            ..Default::default()
        },
        ..Default::default()
    };
    let source = locate(&root, &opts).unwrap();
    assert_eq!(source.num_classes(), 3);
    let mut cfg = small_recipe(3, 1000, 1000, 1);
    cfg.classes = 3;
    cfg.validation_split = Some(0.25);
    let out = tmp.path().join("run");
    let mut job = TrainJob::new(cfg, source.clone(), fake_vgg(4), out.clone());
    job.cache_dir = tmp.path().join("cache");
    let done = job.run(&mut Silent).unwrap();
    let rep = done.test_report.unwrap();
    assert_eq!(rep.samples, source.load(Split::Test).unwrap().len());
    let model = SavedModel::load(&out.join("model.npz")).unwrap();
    assert_eq!(model.meta.class_names, CLASSES);
    assert_eq!(model.meta.resize, "center-crop");
    // evaluate on the same folder: the same report as the run's test report.
    let test = source.load(Split::Test).unwrap();
    let ev = EvaluateJob {
        model: &model,
        data: &test,
        records: test.len(),
        batch_size: 7,
        cache_dir: Some(tmp.path().join("cache")),
    }
    .run(&mut Silent)
    .unwrap();
    assert!(ev.cache.is_some(), "the run's test cache serves evaluate");
    assert_eq!(ev.report.confusion_matrix, rep.confusion_matrix);
    // Read with another resize policy: refused, naming the right one.
    let stretched = locate(&root, &DataOptions::default())
        .unwrap()
        .load(Split::Test)
        .unwrap();
    let e = EvaluateJob {
        model: &model,
        data: &stretched,
        records: 5,
        batch_size: 4,
        cache_dir: None,
    }
    .run(&mut Silent)
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--resize center-crop"), "{e}");
    // predict on the test files gives the evaluate's top-1 for each.
    let Records::Files(r) = &test.records else { panic!() };
    let mut top1 = Vec::new();
    let failed = PredictJob {
        model: &model,
        images: &r.files,
        top_k: 2,
        batch_size: 3,
    }
    .run(|_, a| top1.push(a.unwrap()[0].0.clone()));
    assert_eq!(failed, 0);
    let want: Vec<String> = ev
        .logits
        .rows()
        .into_iter()
        .map(|row| {
            let best = row
                .iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
            CLASSES[best].to_string()
        })
        .collect();
    assert_eq!(top1, want);
    // A model of other classes is refused on this data.
    let cifar_test = cifar::load_split(&cifar::locate(&sample_dir()).unwrap(), Split::Test).unwrap();
    let e = EvaluateJob {
        model: &model,
        data: &cifar_test,
        records: 5,
        batch_size: 4,
        cache_dir: None,
    }
    .run(&mut Silent)
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("classes"), "{e}");
    // The configuration must agree with the dataset's classes.
    let mut wrong = small_recipe(3, 10, 10, 1);
    wrong.classes = 10;
    let e = TrainJob::new(wrong, source, fake_vgg(4), tmp.path().join("run2"))
        .run(&mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("10 classes, the dataset 3"), "{e}");
}

#[test]
fn palette_png_is_converted_to_rgb() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pal.png");
    let f = std::fs::File::create(&p).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 2, 1);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(vec![10, 20, 30, 200, 100, 50]);
    enc.write_header().unwrap().write_image_data(&[1, 0]).unwrap();
    let img = decode_rgb(&p).unwrap();
    assert_eq!(*img.get_pixel(0, 0), Rgb([200, 100, 50]));
    assert_eq!(*img.get_pixel(1, 0), Rgb([10, 20, 30]));
}

/// The binary on a folder: train, evaluate, predict --csv, extract, and
/// summary for 100 classes.
#[test]
fn cli_trains_evaluates_predicts_and_extracts_on_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("photos");
    make_flat(&root, [8, 8, 8]);
    let w = tmp.path().join("w.npz");
    fake_vgg(8).save_npz(&w).unwrap();
    let (w, r, run, cache) = (
        w.to_str().unwrap().to_string(),
        root.to_str().unwrap().to_string(),
        tmp.path().join("run"),
        tmp.path().join("cache"),
    );
    let (run_s, cache_s) = (run.to_str().unwrap(), cache.to_str().unwrap());
    let common = ["--data", &r, "--weights", &w, "--image-size", "32"];
    let mut args = vec!["train"];
    args.extend(common);
    args.extend([
        "--stage1-epochs",
        "1",
        "--stage2-epochs",
        "1",
        "--test-split",
        "0.3",
        "--out",
        run_s,
        "--cache-dir",
        cache_s,
    ]);
    let out = vgg16(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("skipped 1 unreadable image(s)") && err.contains("corrupt.jpg"),
        "{err}"
    );
    assert!(err.contains("3 classes"), "{err}");
    // evaluate: the same folder split (--test-split as in training).
    let out = vgg16(&[
        "evaluate",
        "--model",
        run_s,
        "--data",
        &r,
        "--test-split",
        "0.3",
        "--cache-dir",
        cache_s,
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("test_report.json")).unwrap()).unwrap();
    assert_eq!(v["confusion_matrix"], saved["confusion_matrix"]);
    assert!(err.contains("cache hit"), "{err}");
    // predict a folder into a CSV.
    let csv = tmp.path().join("p.csv");
    let out = vgg16(&[
        "predict",
        "--model",
        run_s,
        root.join("sea lion").to_str().unwrap(),
        root.join("Zebra").to_str().unwrap(),
        "--top-k",
        "2",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "corrupt.jpg is named and counted: {err}");
    assert!(err.contains("1 of 21 images could not be read"), "{err}");
    let mut rd = csv::Reader::from_path(&csv).unwrap();
    assert_eq!(
        rd.headers().unwrap(),
        vec!["path", "class_1", "probability_1", "class_2", "probability_2", "error"]
    );
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 21, "8 + 8 + 4 odd formats + corrupt.jpg");
    for row in &rows {
        if row[0].ends_with("corrupt.jpg") {
            assert!(row[5].contains("not a readable"), "{row:?}");
        } else {
            assert!(CLASSES.contains(&&row[1]) && row[5].is_empty(), "{row:?}");
            let (p1, p2): (f64, f64) = (row[2].parse().unwrap(), row[4].parse().unwrap());
            assert!(p1 >= p2 && p1 <= 1.0 && p2 >= 0.0, "{row:?}");
        }
    }
    // extract from the folder: labels are the folder's.
    let npz = tmp.path().join("g.npz");
    let mut args = vec!["extract"];
    args.extend(common);
    args.extend(["--split", "train", "--layers", "gap", "--out", npz.to_str().unwrap()]);
    let out = vgg16(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut z = ndarray_npy::NpzReader::new(std::fs::File::open(&npz).unwrap()).unwrap();
    let labels: ndarray::Array1<u8> = z.by_name("label.npy").unwrap();
    let want = Folder::scan(
        &root,
        &FolderOptions {
            test_split: Some(0.2),
            ..Default::default()
        },
    )
    .unwrap()
    .dataset(Split::Train)
    .labels;
    assert_eq!(labels.to_vec(), want);
    // summary for 100 classes: the head is 512 x 100 + 100.
    let out = vgg16(&["summary", "--image-size", "32", "--classes", "100"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("51,300") || text.contains("51300"), "{text}");
}

#[test]
fn a_val_folder_beside_test_is_the_validation_set() {
    use vgg16_cpu::{Observer, Silent, TrainJob};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("photos");
    make_flat(&root.join("train"), [6, 6, 6]);
    for (c, class) in CLASSES.iter().enumerate() {
        for i in 0..2 {
            save_png(
                &root.join("test").join(class).join(format!("t{i}.png")),
                &solid(8, 8, [c as u8, 0, 0]),
            );
            save_png(
                &root.join("val").join(class).join(format!("v{i}.png")),
                &solid(8, 8, [0, c as u8, 0]),
            );
        }
    }
    let f = Folder::scan(&root, &FolderOptions::default()).unwrap();
    assert_eq!(
        f.layout,
        Layout::Split {
            train: "train".into(),
            test: "test".into(),
            val: Some("val".into())
        }
    );
    assert_eq!(f.test.len(), 6);
    let ds = f.dataset(Split::Train);
    assert!(ds.has_validation_folder());
    assert_eq!(ds.len(), 10 + 6 + 6 + 6);
    let (tr, val) = ds.validation_split(ds.len(), 0.5);
    assert_eq!(val.len(), 6, "the val/ files, whatever the fraction");
    let Records::Files(r) = &ds.records else { panic!() };
    assert!(val.iter().all(|&i| r.files[i].starts_with(root.join("val"))));
    assert!(tr.iter().all(|&i| r.files[i].starts_with(root.join("train"))));
    // The job validates on val/ and tests on test/.
    struct Lines(Vec<String>);
    impl Observer for Lines {
        fn info(&mut self, l: &str) {
            self.0.push(l.to_string());
        }
    }
    let source = DataSource::Folder(Box::new(f));
    let mut cfg = small_recipe(1, 1000, 1000, 1);
    cfg.classes = 3;
    cfg.restore_best = true;
    let mut job = TrainJob::new(cfg.clone(), source.clone(), fake_vgg(2), tmp.path().join("run"));
    job.cache_dir = tmp.path().join("cache");
    let mut lines = Lines(vec![]);
    job.run(&mut lines).unwrap();
    assert!(
        lines
            .0
            .iter()
            .any(|l| l.contains("training on 22 records, validating on 6 held-out")),
        "{:?}",
        lines.0
    );
    // --validation-split on top of it is refused, not silently ignored.
    cfg.validation_split = Some(0.2);
    let e = TrainJob::new(cfg, source, fake_vgg(2), tmp.path().join("run2"))
        .run(&mut Silent)
        .unwrap_err()
        .to_string();
    assert!(e.contains("own validation folder"), "{e}");
    // --restore-best with nothing held out is refused (never on the test set).
    let mut c = small_recipe(1, 40, 20, 1);
    c.restore_best = true;
    let e = TrainJob::new(
        c,
        cifar::locate(&sample_dir()).unwrap(),
        fake_vgg(2),
        tmp.path().join("run3"),
    )
    .run(&mut Silent)
    .unwrap_err()
    .to_string();
    assert!(e.contains("--restore-best needs --validation-split"), "{e}");
}

#[test]
fn the_flipped_view_mirrors_every_image_and_is_keyed_apart() {
    use vgg16_cpu::features::cache::Dtype;
    // CIFAR records and folder files alike.
    let cifar_ds = cifar::load_split(&cifar::locate(&sample_dir()).unwrap(), Split::Test).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    make_flat(tmp.path(), [3, 3, 3]);
    let folder_ds = Folder::scan(tmp.path(), &FolderOptions::default())
        .unwrap()
        .dataset(Split::Train);
    for ds in [cifar_ds, folder_ds] {
        let fl = ds.flipped();
        let idx = [0usize, 2, 1];
        for size in [32, 40] {
            let (a, b) = (ds.input(&idx, size).unwrap(), fl.input(&idx, size).unwrap());
            for n in 0..3 {
                for y in 0..size {
                    for x in 0..size {
                        for c in 0..3 {
                            assert_eq!(a[[n, y, x, c]], b[[n, y, size - 1 - x, c]]);
                        }
                    }
                }
            }
        }
        assert_ne!(ds.digest(), fl.digest());
        let (k, kf) = (
            CacheKey::new(&"0".repeat(64), 32, &ds, 3, Dtype::F32),
            CacheKey::new(&"0".repeat(64), 32, &fl, 3, Dtype::F32),
        );
        assert_ne!(k.id(), kf.id());
        assert!(kf.dir_name().contains("-hflip-32px-"), "{}", kf.dir_name());
        assert!(!k.dir_name().contains("hflip"));
    }
}

#[test]
fn each_record_is_flipped_about_half_the_epochs_from_the_seed() {
    use vgg16_cpu::train::recipe::flipped;
    let n = (0..10_000).filter(|&r| flipped(7, 2, 3, r)).count();
    assert!((4_800..=5_200).contains(&n), "{n} of 10000");
    // Another epoch or seed draws again; the same ones draw the same.
    let a: Vec<bool> = (0..64).map(|r| flipped(7, 2, 3, r)).collect();
    assert_eq!(a, (0..64).map(|r| flipped(7, 2, 3, r)).collect::<Vec<_>>());
    assert_ne!(a, (0..64).map(|r| flipped(7, 2, 4, r)).collect::<Vec<_>>());
    assert_ne!(a, (0..64).map(|r| flipped(8, 2, 3, r)).collect::<Vec<_>>());
}

#[test]
fn a_flip_run_builds_the_mirrored_cache_and_differs_from_a_plain_one() {
    use vgg16_cpu::{Silent, TrainJob};
    let tmp = tempfile::tempdir().unwrap();
    let run = |flip: bool, name: &str| {
        let mut cfg = small_recipe(5, 48, 16, 1);
        cfg.flip = flip;
        let mut job = TrainJob::new(
            cfg,
            cifar::locate(&sample_dir()).unwrap(),
            fake_vgg(3),
            tmp.path().join(name),
        );
        job.cache_dir = tmp.path().join("cache");
        job.run(&mut Silent).unwrap()
    };
    let plain = run(false, "plain");
    let f1 = run(true, "f1");
    let f2 = run(true, "f2");
    let dirs: Vec<String> = std::fs::read_dir(tmp.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        dirs.iter().filter(|d| d.starts_with("train-hflip-32px-n48-")).count(),
        1,
        "{dirs:?}"
    );
    assert_eq!(history_numbers(&f1.history), history_numbers(&f2.history), "seeded");
    assert_ne!(history_numbers(&plain.history), history_numbers(&f1.history));
}

/// CIFAR-100 through the binary: train on the coarse labels, then evaluate
/// finds CIFAR-100 by itself (the model has 20 classes) and reports top-5.
#[test]
fn cli_trains_and_evaluates_on_cifar100_coarse() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c100");
    write_cifar100(&dir, 60, 12);
    let w = tmp.path().join("w.npz");
    fake_vgg(8).save_npz(&w).unwrap();
    let run = tmp.path().join("run");
    let d = dir.to_str().unwrap();
    let out = vgg16(&[
        "train",
        "--data",
        d,
        "--dataset",
        "cifar100",
        "--label-mode",
        "coarse",
        "--weights",
        w.to_str().unwrap(),
        "--image-size",
        "32",
        "--stage1-epochs",
        "1",
        "--stage2-epochs",
        "1",
        "--out",
        run.to_str().unwrap(),
        "--cache-dir",
        tmp.path().join("cache").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("CIFAR-100 (coarse labels)"), "{err}");
    let out = vgg16(&["evaluate", "--model", run.to_str().unwrap(), "--data", d, "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["samples"], 12);
    assert_eq!(v["confusion_matrix"].as_array().unwrap().len(), 20);
    assert_eq!(v["top_k"]["k"], 5);
    assert_eq!(v["per_class"][3]["name"], "coarse_3");
}
