//! VGG-16 preprocessing (Keras `vgg16.preprocess_input`, "caffe" mode) and
//! bilinear resize with half-pixel centers and no antialiasing (what the
//! Keras `Resizing` layer, i.e. `tf.image.resize(..., "bilinear")`, does).

use ndarray::Array4;
use rayon::prelude::*;

/// ImageNet channel means in BGR order, subtracted after RGB -> BGR.
pub const MEANS_BGR: [f32; 3] = [103.939, 116.779, 123.68];

/// The preprocessing this crate applies, as recorded in caches and models.
pub const PREPROCESSING: &str =
    "keras-vgg16-caffe: RGB->BGR, minus B 103.939 G 116.779 R 123.68; bilinear half-pixel resize, no antialias";

/// One planar-RGB CIFAR record (3 x 32 x 32 bytes) -> (32, 32, 3) BGR f32,
/// mean-subtracted, HWC order.
pub fn preprocess_planar(rgb: &[u8], side: usize, out: &mut [f32]) {
    let plane = side * side;
    assert_eq!(rgb.len(), 3 * plane, "preprocess: expected {} bytes", 3 * plane);
    assert_eq!(
        out.len(),
        3 * plane,
        "preprocess: output must hold {} floats",
        3 * plane
    );
    for p in 0..plane {
        let (r, g, b) = (rgb[p] as f32, rgb[plane + p] as f32, rgb[2 * plane + p] as f32);
        out[3 * p] = b - MEANS_BGR[0];
        out[3 * p + 1] = g - MEANS_BGR[1];
        out[3 * p + 2] = r - MEANS_BGR[2];
    }
}

/// Bilinear resize of one HWC image, half-pixel centers, no antialias:
/// source coordinate = (dst + 0.5) * in/out - 0.5, clamped to the edge.
pub fn resize_bilinear(src: &[f32], h: usize, w: usize, c: usize, oh: usize, ow: usize, dst: &mut [f32]) {
    assert_eq!(src.len(), h * w * c);
    assert_eq!(dst.len(), oh * ow * c);
    if h == oh && w == ow {
        dst.copy_from_slice(src);
        return;
    }
    let axis = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
        let scale = inp as f32 / out as f32;
        (0..out)
            .map(|o| {
                let s = (o as f32 + 0.5) * scale - 0.5;
                let f = s.floor();
                let frac = s - f;
                let lo = (f.max(0.0) as usize).min(inp - 1);
                let hi = ((f + 1.0).max(0.0) as usize).min(inp - 1);
                (lo, hi, frac)
            })
            .collect()
    };
    let ys = axis(oh, h);
    let xs = axis(ow, w);
    for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, fx)) in xs.iter().enumerate() {
            for ch in 0..c {
                let at = |y: usize, x: usize| src[(y * w + x) * c + ch];
                let top = at(y0, x0) + (at(y0, x1) - at(y0, x0)) * fx;
                let bot = at(y1, x0) + (at(y1, x1) - at(y1, x0)) * fx;
                dst[(oy * ow + ox) * c + ch] = top + (bot - top) * fy;
            }
        }
    }
}

/// A batch of planar-RGB 32x32 records -> (N, S, S, 3) network input.
pub fn preprocess_batch(records: &[&[u8]], size: usize) -> Array4<f32> {
    const SIDE: usize = crate::data::cifar::SIDE;
    let mut out = Array4::<f32>::zeros((records.len(), size, size, 3));
    if records.is_empty() {
        return out;
    }
    out.as_slice_mut()
        .expect("fresh")
        .par_chunks_mut(size * size * 3)
        .zip(records.par_iter())
        .for_each(|(dst, rec)| {
            let mut small = vec![0.0f32; SIDE * SIDE * 3];
            preprocess_planar(rec, SIDE, &mut small);
            resize_bilinear(&small, SIDE, SIDE, 3, size, size, dst);
        });
    out
}

/// Reads any PNG, JPEG or BMP and makes it a CIFAR-like record: RGB,
/// resized to 32x32 (image's triangle filter, which averages when
/// shrinking), as 3,072 planar bytes. The model then resizes 32 -> S like
/// its training images, so photos go through the same pipeline as CIFAR.
pub fn load_as_cifar(path: &std::path::Path) -> crate::Result<Vec<u8>> {
    use crate::error::{Error, IoContext};
    let img = image::ImageReader::open(path)
        .at("cannot open", path)?
        .with_guessed_format()
        .at("cannot read", path)?
        .decode()
        .map_err(|e| Error::invalid(path, format!("not a readable PNG, JPEG or BMP image ({e})")))?
        .to_rgb8();
    let side = crate::data::cifar::SIDE as u32;
    let small = if img.dimensions() == (side, side) {
        img
    } else {
        image::imageops::resize(&img, side, side, image::imageops::FilterType::Triangle)
    };
    let plane = (side * side) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, px) in small.pixels().enumerate() {
        out[i] = px[0];
        out[plane + i] = px[1];
        out[2 * plane + i] = px[2];
    }
    Ok(out)
}
