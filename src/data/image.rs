//! VGG-16 preprocessing (Keras `vgg16.preprocess_input`, "caffe" mode) and
//! bilinear resize with half-pixel centers and no antialiasing (what the
//! Keras `Resizing` layer, i.e. `tf.image.resize(..., "bilinear")`, does).

use super::Resize;
use ndarray::Array4;
use rayon::prelude::*;
use std::path::Path;

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
    bilinear(src, h, w, c, oh, ow, dst);
}

/// The sampling of [`resize_bilinear`] from any pixel type.
fn bilinear<T: Copy + Into<f32>>(src: &[T], h: usize, w: usize, c: usize, oh: usize, ow: usize, dst: &mut [f32]) {
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
                let at = |y: usize, x: usize| -> f32 { src[(y * w + x) * c + ch].into() };
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

/// Decodes an image file of any supported format (JPEG, PNG, BMP, WebP,
/// GIF's first frame) to 8-bit RGB, with its EXIF orientation applied.
/// Grayscale, palette, 16-bit and alpha images are converted (alpha
/// dropped, 16-bit scaled to 8).
pub fn decode_rgb(path: &Path) -> crate::Result<image::RgbImage> {
    use crate::error::{Error, IoContext};
    use image::ImageDecoder;
    let unreadable =
        |e: image::ImageError| Error::invalid(path, format!("not a readable JPEG, PNG, BMP, WebP or GIF image ({e})"));
    let mut decoder = image::ImageReader::open(path)
        .at("cannot open", path)?
        .with_guessed_format()
        .at("cannot read", path)?
        .into_decoder()
        .map_err(unreadable)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(unreadable)?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// The largest centred square of an image (Keras's
/// `crop_to_aspect_ratio=True` for a square target).
pub fn center_square(img: &image::RgbImage) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let side = w.min(h);
    image::imageops::crop_imm(img, (w - side) / 2, (h - side) / 2, side, side).to_image()
}

/// 8-bit RGB (H, W, 3) -> (S, S, 3) network input: bilinear resize
/// (half-pixel centers, no antialias), then RGB->BGR minus the means.
pub fn rgb_to_input(img: &image::RgbImage, size: usize, dst: &mut [f32]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    bilinear(img.as_raw(), h, w, 3, size, size, dst);
    for px in dst.chunks_exact_mut(3) {
        let (r, g, b) = (px[0], px[1], px[2]);
        px[0] = b - MEANS_BGR[0];
        px[1] = g - MEANS_BGR[1];
        px[2] = r - MEANS_BGR[2];
    }
}

/// One image file -> its (S, S, 3) network input in `dst`, the way
/// `resize` says: straight to S (stretch or centre crop), or through a
/// 32x32 CIFAR-like record for models trained on CIFAR.
pub fn load_resized_into(path: &Path, resize: Resize, size: usize, dst: &mut [f32]) -> crate::Result<()> {
    assert_eq!(
        dst.len(),
        size * size * 3,
        "load_resized_into: output must hold S*S*3 floats"
    );
    match resize {
        Resize::Cifar32 => {
            let rec = load_as_cifar(path)?;
            let side = crate::data::cifar::SIDE;
            let mut small = vec![0.0f32; side * side * 3];
            preprocess_planar(&rec, side, &mut small);
            resize_bilinear(&small, side, side, 3, size, size, dst);
        }
        Resize::Stretch => rgb_to_input(&decode_rgb(path)?, size, dst),
        Resize::CenterCrop => rgb_to_input(&center_square(&decode_rgb(path)?), size, dst),
    }
    Ok(())
}

/// Reads any supported image and makes it a CIFAR-like record: RGB,
/// resized to 32x32 (image's triangle filter, which averages when
/// shrinking), as 3,072 planar bytes. A CIFAR model then resizes 32 -> S
/// like its training images, so photos go through the same pipeline.
pub fn load_as_cifar(path: &Path) -> crate::Result<Vec<u8>> {
    let img = decode_rgb(path)?;
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
