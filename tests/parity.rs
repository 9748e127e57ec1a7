//! Parity with an independent implementation: every array of
//! ../shared/fixtures/vgg16_reference/reference_{32,64,224}.npz (ONNX
//! Runtime CPU kernels, cross-checked against Keras; see its README),
//! reproduced from the shared CIFAR-10 archive and weights, each within
//! 1e-4 * max |reference| (max absolute difference), on every conv path
//! this CPU runs (direct kernel and Winograd per ISA, im2col + GEMM); the
//! paths we own are also held to a tighter bound, [`OWN_REL`].

mod common;
use ndarray::{ArrayD, Axis, IxDyn};
use ndarray_npy::NpzReader;
use std::fs::File;
use vgg16_cpu::data::cifar::{self, Split};
use vgg16_cpu::data::image::{preprocess_batch, preprocess_planar, resize_bilinear};
use vgg16_cpu::model::vgg::{layer_index, Vgg16, LAYERS};
use vgg16_cpu::tensor::dispatch::{ConvAlgo, Dispatch};
use vgg16_cpu::tensor::ops::gap_forward;

/// The fixture README's bound, relative to the array's largest magnitude.
const PARITY_REL: f32 = 1e-4;
/// Ours, for the whole network on any path: measured up to 7.9e-6 (direct,
/// im2col) and 8.8e-6 (Winograd) of max |ref| at 224 px (BENCHMARKS.md).
const OWN_REL: f32 = 2e-5;

fn compare(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) -> f32 {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let diff = got
        .iter()
        .zip(want.iter())
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let rel = diff / scale;
    eprintln!("  {what:<14} max|diff| {diff:.3e}  max|ref| {scale:.3e}  rel {rel:.2e}");
    assert!(
        rel <= PARITY_REL.min(OWN_REL),
        "{what}: max |diff| {diff} is {rel:.2e} of max |ref| {scale} (bound {})",
        PARITY_REL.min(OWN_REL)
    );
    rel
}

#[test]
#[cfg_attr(not(has_shared), ignore = "needs ../shared (weights, archive, fixtures)")]
fn matches_reference_activations_at_32_64_224() {
    let shared = common::shared();
    let model = Vgg16::load_npz(&shared.join("weights/vgg16_imagenet_notop.npz")).expect("shared weights");
    let source = cifar::locate(&shared.join("data/cifar-10-binary.tar.gz")).expect("shared archive");
    let test = cifar::load_split(&source, Split::Test).expect("test split");
    for size in [32usize, 64, 224] {
        let path = shared.join(format!("fixtures/vgg16_reference/reference_{size}.npz"));
        eprintln!("reference_{size}.npz");
        let mut npz = NpzReader::new(File::open(&path).expect("fixture")).expect("npz");
        let names = npz.names().unwrap();
        let index: ndarray::Array1<i64> = npz.by_name("index").unwrap();
        let idx: Vec<usize> = index.iter().map(|&i| i as usize).collect();
        let get = |npz: &mut NpzReader<File>, k: &str| -> ArrayD<f32> { npz.by_name(k).unwrap() };

        // The reader: the record bytes and labels are what the reference read.
        let img: ndarray::Array4<u8> = npz.by_name("image_uint8_rgb").unwrap();
        let labels: ndarray::Array1<u8> = npz.by_name("label").unwrap();
        for (j, &i) in idx.iter().enumerate() {
            assert_eq!(test.labels[i], labels[j], "label of test record {i}");
            let rec = test.image(i);
            for y in 0..32 {
                for x in 0..32 {
                    for c in 0..3 {
                        assert_eq!(
                            rec[c * 1024 + y * 32 + x],
                            img[[j, y, x, c]],
                            "pixel of test record {i}"
                        );
                    }
                }
            }
        }

        // Preprocessing and resize, separately.
        let n = idx.len();
        let mut pre = vec![0.0f32; n * 32 * 32 * 3];
        for (j, &i) in idx.iter().enumerate() {
            preprocess_planar(test.image(i), 32, &mut pre[j * 3072..(j + 1) * 3072]);
        }
        let pre = ArrayD::from_shape_vec(IxDyn(&[n, 32, 32, 3]), pre).unwrap();
        compare("preprocessed", &pre, &get(&mut npz, "preprocessed"));
        let mut rs = vec![0.0f32; n * size * size * 3];
        for j in 0..n {
            let src = pre.index_axis(Axis(0), j).to_owned().into_raw_vec_and_offset().0;
            resize_bilinear(
                &src,
                32,
                32,
                3,
                size,
                size,
                &mut rs[j * size * size * 3..(j + 1) * size * size * 3],
            );
        }
        let rs = ArrayD::from_shape_vec(IxDyn(&[n, size, size, 3]), rs).unwrap();
        compare("resized", &rs, &get(&mut npz, "resized"));

        // The network, from the records through the batch pipeline.
        let recs: Vec<&[u8]> = idx.iter().map(|&i| test.image(i)).collect();
        let x = preprocess_batch(&recs, size);
        compare("batch input", &x.clone().into_dyn(), &get(&mut npz, "resized"));
        // The whole network on every path: the default dispatch, then each
        // algorithm forced on each ISA this CPU runs.
        let mut dispatches = vec![Dispatch::global()];
        for isa in common::isas_or_skip("parity") {
            for conv in [ConvAlgo::Direct, ConvAlgo::Winograd, ConvAlgo::Im2col] {
                dispatches.push(Dispatch { isa, conv });
            }
        }
        for d in dispatches {
            eprintln!(" {} / {}", d.isa.name(), d.conv.name());
            let mut acts = std::collections::HashMap::new();
            let y = model
                .prepare_with(d)
                .forward_range(x.clone(), 0..LAYERS.len(), &mut |i, a| {
                    acts.insert(LAYERS[i].name, a.to_owned().into_dyn());
                });
            let mut checked = 0;
            for name in &names {
                if layer_index(name).is_some() {
                    compare(name, &acts[name.as_str()], &get(&mut npz, name));
                    checked += 1;
                }
            }
            compare("gap", &gap_forward(y.view()).into_dyn(), &get(&mut npz, "gap"));
            assert!(
                checked >= 2,
                "reference_{size}.npz: expected layer arrays, found {names:?}"
            );
        }
    }
}
