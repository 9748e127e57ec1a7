//! Weights I/O: the .npz loader on malformed files, save/load round trip,
//! and the ONNX import (layout transpose, names, errors) on a hand-built
//! ONNX model.

use ndarray::{Array1, Array4};
use ndarray_npy::NpzWriter;
use prost::Message;
use std::path::Path;
use vgg16_cpu::model::onnx_import::proto::{GraphProto, ModelProto, TensorProto, FLOAT};
use vgg16_cpu::model::onnx_import::weights_from_onnx;
use vgg16_cpu::model::vgg::{convs, ConvParams, Vgg16, WeightsError};

/// Small-valued deterministic weights of the right shapes.
fn model() -> Vgg16 {
    Vgg16 {
        convs: convs()
            .enumerate()
            .map(|(l, (_, _, cin, cout))| ConvParams {
                w: Array4::from_shape_fn((3, 3, cin, cout), |(a, b, c, d)| {
                    ((a * 7 + b * 5 + c * 3 + d + l) % 11) as f32 * 1e-3
                }),
                b: Array1::from_shape_fn(cout, |i| (i + l) as f32 * 1e-2),
            })
            .collect(),
    }
}

/// Writes an npz from (key, array) pairs, with `edit` applied to the list.
fn write_npz(path: &Path, edit: impl FnOnce(&mut Vec<(String, ndarray::ArrayD<f32>)>)) {
    let m = model();
    let mut arrays: Vec<(String, ndarray::ArrayD<f32>)> = Vec::new();
    for ((_, name, _, _), p) in convs().zip(&m.convs) {
        arrays.push((format!("{name}/kernel"), p.w.clone().into_dyn()));
        arrays.push((format!("{name}/bias"), p.b.clone().into_dyn()));
    }
    edit(&mut arrays);
    let mut npz = NpzWriter::new(std::fs::File::create(path).unwrap());
    for (k, a) in &arrays {
        npz.add_array(k.as_str(), a).unwrap();
    }
    npz.finish().unwrap();
}

#[test]
fn save_load_round_trip_keeps_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let p = tmp.path().join("w.npz");
    m.save_npz(&p).unwrap();
    let back = Vgg16::load_npz(&p).unwrap();
    assert_eq!(back.digest(), m.digest());
    assert_eq!(back.convs[12].w, m.convs[12].w);
    // No temporary files are left beside it.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn missing_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("w.npz");
    write_npz(&p, |a| a.retain(|(k, _)| k != "block4_conv2/bias"));
    let err = Vgg16::load_npz(&p).unwrap_err();
    assert!(matches!(err, WeightsError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("block4_conv2/bias"), "{err}");
}

#[test]
fn wrong_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("w.npz");
    // A kernel in (out, in, kh, kw) order instead of Keras's layout.
    write_npz(&p, |a| {
        let e = a.iter_mut().find(|(k, _)| k == "block1_conv1/kernel").unwrap();
        e.1 = ndarray::ArrayD::zeros(vec![64, 3, 3, 3]);
    });
    let msg = Vgg16::load_npz(&p).unwrap_err().to_string();
    assert!(
        msg.contains("block1_conv1/kernel") && msg.contains("[64, 3, 3, 3]") && msg.contains("[3, 3, 3, 64]"),
        "{msg}"
    );
}

#[test]
fn nan_and_inf_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("w.npz");
    write_npz(&p, |a| {
        let e = a.iter_mut().find(|(k, _)| k == "block5_conv3/kernel").unwrap();
        e.1[[0, 1, 2, 3]] = f32::NAN;
        e.1[[1, 1, 2, 3]] = f32::INFINITY;
    });
    let err = Vgg16::load_npz(&p).unwrap_err();
    assert!(matches!(err, WeightsError::NotFinite { bad: 2, .. }), "{err}");
    assert!(err.to_string().contains("block5_conv3/kernel"), "{err}");
}

#[test]
fn not_an_npz_and_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("w.npz");
    std::fs::write(&p, b"definitely not a zip archive").unwrap();
    let msg = Vgg16::load_npz(&p).unwrap_err().to_string();
    assert!(msg.contains("w.npz") && msg.contains("not a valid .npz"), "{msg}");
    let msg = Vgg16::load_npz(&tmp.path().join("nope.npz")).unwrap_err().to_string();
    assert!(msg.contains("nope.npz"), "{msg}");
}

fn onnx_model(m: &Vgg16, skip: Option<&str>) -> Vec<u8> {
    let mut init = Vec::new();
    for ((_, name, cin, cout), p) in convs().zip(&m.convs) {
        // ONNX stores (out, in, kh, kw).
        let oihw = p.w.view().permuted_axes([3, 2, 0, 1]).as_standard_layout().into_owned();
        let kname = format!("functional_1/{name}_1/convolution/ReadVariableOp:0");
        if skip != Some(name) {
            init.push(TensorProto {
                dims: vec![cout as i64, cin as i64, 3, 3],
                data_type: FLOAT,
                float_data: vec![],
                name: kname,
                raw_data: oihw.iter().flat_map(|v| v.to_le_bytes()).collect(),
            });
        }
        // Biases as float_data, the other storage ONNX allows.
        init.push(TensorProto {
            dims: vec![cout as i64],
            data_type: FLOAT,
            float_data: p.b.to_vec(),
            name: format!("functional_1/{name}_1/Squeeze:0"),
            raw_data: vec![],
        });
    }
    ModelProto {
        graph: Some(GraphProto { initializer: init }),
    }
    .encode_to_vec()
}

#[test]
fn onnx_import_transposes_to_keras_layout() {
    let m = model();
    let got = weights_from_onnx(&onnx_model(&m, None), Path::new("test.onnx")).unwrap();
    assert_eq!(got.digest(), m.digest());
    assert_eq!(got.convs[3].w[[2, 1, 5, 7]], m.convs[3].w[[2, 1, 5, 7]]);
}

#[test]
fn onnx_import_errors_name_what_is_missing() {
    let m = model();
    let msg = weights_from_onnx(&onnx_model(&m, Some("block3_conv2")), Path::new("t.onnx"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("functional_1/block3_conv2_1/convolution/ReadVariableOp:0"),
        "{msg}"
    );
    let msg = weights_from_onnx(b"\xff\xff\xff garbage", Path::new("t.onnx"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("t.onnx"), "{msg}");
}
