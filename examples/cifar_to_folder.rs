//! Turns records of a CIFAR-10 (or CIFAR-100) binary archive into an image
//! folder dataset of JPEGs at random sizes, the layout a user's own photos
//! have:
//!
//! ```text
//! OUT/train/<class>/<record>.jpg    OUT/test/<class>/<record>.jpg
//! ```
//!
//! Each 32x32 record is enlarged (Catmull-Rom) to a random width and height
//! in [48, 160] (seeded, so the folder is reproducible) and saved as JPEG
//! quality 95. Training on the folder at 32 px should land within noise of
//! training on the same records from the archive (BENCHMARKS.md section 9).
//!
//! cargo run --release --example cifar_to_folder -- DATA OUT [TRAIN_N [TEST_N [SEED [MIN MAX]]]]
//!
//! MIN and MAX (default 48 and 160) bound the random side lengths; e.g.
//! 375 500 gives photo-sized files for timing the input pipeline at 224 px.

use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use vgg16_cpu::data::{DataOptions, Split};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: cifar_to_folder DATA OUT [TRAIN_N [TEST_N [SEED [MIN MAX]]]]");
        std::process::exit(2);
    }
    let (data, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let arg = |i: usize, d: usize| args.get(i).map_or(Ok(d), |s| s.parse::<usize>());
    let (n_train, n_test, seed) = (arg(2, usize::MAX)?, arg(3, usize::MAX)?, arg(4, 1337)? as u64);
    let (lo, hi) = (arg(5, 48)? as u32, arg(6, 160)? as u32);
    let source = vgg16_cpu::data::locate(&data, &DataOptions::default())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (split, limit) in [(Split::Train, n_train), (Split::Test, n_test)] {
        let ds = source.load(split)?;
        let n = limit.min(ds.len());
        for name in &ds.class_names {
            std::fs::create_dir_all(out.join(split.name()).join(name))?;
        }
        for i in 0..n {
            let rec = ds.image(i);
            let plane = 32 * 32;
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let p = (y * 32 + x) as usize;
                image::Rgb([rec[p], rec[plane + p], rec[2 * plane + p]])
            });
            let (w, h) = (rng.gen_range(lo..=hi), rng.gen_range(lo..=hi));
            let big = image::imageops::resize(&img, w, h, image::imageops::FilterType::CatmullRom);
            let path = out
                .join(split.name())
                .join(&ds.class_names[ds.labels[i] as usize])
                .join(format!("{i:05}.jpg"));
            let f = std::io::BufWriter::new(std::fs::File::create(&path)?);
            image::codecs::jpeg::JpegEncoder::new_with_quality(f, 95).encode_image(&big)?;
        }
        eprintln!("{}: {n} images -> {}", split.name(), out.join(split.name()).display());
    }
    Ok(())
}
