//! VGG-16's convolutional base: the layer table (Keras names), the
//! parameters, weights I/O (`.npz`, Keras layout), digest and probes, and the
//! forward pass over any range of layers.

pub use crate::model::params::{ConvParams, WeightsError};
use crate::model::params::{NpzIn, NpzOut};
use crate::tensor::conv::{conv3x3_forward_path, conv3x3_forward_prepared_into, PreparedKernel};
use crate::tensor::dispatch::{ConvAlgo, ConvPath, Dispatch};
use crate::tensor::ops::{gap_forward, maxpool2x2_infer_into};
use crate::tensor::pool::BufferPool;
use ndarray::{Array2, Array4, ArrayView4, ArrayViewMut2};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Conv { cin: usize, cout: usize },
    Pool,
}

#[derive(Clone, Copy, Debug)]
pub struct Layer {
    pub name: &'static str,
    pub kind: Kind,
}

const fn conv(name: &'static str, cin: usize, cout: usize) -> Layer {
    Layer {
        name,
        kind: Kind::Conv { cin, cout },
    }
}
const fn pool(name: &'static str) -> Layer {
    Layer { name, kind: Kind::Pool }
}

/// The 18 layers of the base, in order.
pub const LAYERS: [Layer; 18] = [
    conv("block1_conv1", 3, 64),
    conv("block1_conv2", 64, 64),
    pool("block1_pool"),
    conv("block2_conv1", 64, 128),
    conv("block2_conv2", 128, 128),
    pool("block2_pool"),
    conv("block3_conv1", 128, 256),
    conv("block3_conv2", 256, 256),
    conv("block3_conv3", 256, 256),
    pool("block3_pool"),
    conv("block4_conv1", 256, 512),
    conv("block4_conv2", 512, 512),
    conv("block4_conv3", 512, 512),
    pool("block4_pool"),
    conv("block5_conv1", 512, 512),
    conv("block5_conv2", 512, 512),
    conv("block5_conv3", 512, 512),
    pool("block5_pool"),
];

/// Block5, what stage 2 trains, is `LAYERS[BLOCK5_START..]` (three convs
/// and the pool); its convs are `Vgg16::convs[BLOCK5_CONVS]`, named
/// [`block5_names`]. Blocks 1-4 are `LAYERS[..BLOCK5_START]`.
pub const BLOCK5_START: usize = 14;
/// Indices of block5's convs among the 13 conv layers.
pub const BLOCK5_CONVS: std::ops::Range<usize> = 10..13;

/// Keras names of block5's convs, in order.
pub fn block5_names() -> impl Iterator<Item = &'static str> {
    convs().skip(BLOCK5_CONVS.start).map(|(_, name, _, _)| name)
}
/// Parameters of the base: 14,714,688.
pub const BASE_PARAMS: usize = 14_714_688;
/// The content digest of the Keras ImageNet weights (see [`Vgg16::digest`]).
pub const IMAGENET_DIGEST: &str = "d9a27cc1fc7f975ef8cff49180e794ccd7c4bc868ebb49740803b3bbaa8dbefd";
/// Probe values of the ImageNet weights: (key, index in Keras layout, value).
pub const IMAGENET_PROBES: &[(&str, &[usize], f32)] = &[
    ("block1_conv1/kernel", &[0, 0, 0, 0], 0.429_470_57),
    ("block1_conv1/bias", &[25], 0.744_650_2),
    ("block1_conv2/kernel", &[2, 2, 63, 63], 0.016_082_443),
    ("block2_conv1/bias", &[1], 0.064_407_81),
    ("block5_conv1/kernel", &[1, 0, 63, 269], -0.011_236_359),
    ("block5_conv2/bias", &[510], 0.235_172_26),
    ("block5_conv3/kernel", &[0, 2, 0, 400], -0.008_714_244),
];

/// Images per full-network forward batch at input size S: 64 up to 64 px,
/// fewer above (16 at 224), so a batch's activations stay a few hundred MB.
pub fn auto_batch(size: usize) -> usize {
    (16 * 224 * 224 / (size * size).max(1)).clamp(1, 64)
}

/// Largest input size: one image's block1 activations are then 1024 x
/// 1024 x 64 f32 = 256 MiB (a batch holds a few such buffers).
pub const MAX_IMAGE_SIZE: usize = 1024;

/// Checks an input size S: a positive multiple of 32 (VGG-16 halves it
/// five times) up to [`MAX_IMAGE_SIZE`].
pub fn check_image_size(s: usize) -> crate::Result<()> {
    if s == 0 || !s.is_multiple_of(32) || s > MAX_IMAGE_SIZE {
        crate::config_bail!(
            "--image-size {s}: must be a positive multiple of 32 up to {MAX_IMAGE_SIZE} (VGG-16 halves it five times; 32 means no resize; at {MAX_IMAGE_SIZE} one image's first activations take 256 MiB)"
        );
    }
    Ok(())
}

pub fn layer_index(name: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.name == name)
}

/// The conv layers only, in order: (index in LAYERS, name, cin, cout).
pub fn convs() -> impl Iterator<Item = (usize, &'static str, usize, usize)> {
    LAYERS.iter().enumerate().filter_map(|(i, l)| match l.kind {
        Kind::Conv { cin, cout } => Some((i, l.name, cin, cout)),
        Kind::Pool => None,
    })
}

/// The 13 conv layers' parameters, in [`LAYERS`] order.
#[derive(Clone, Debug)]
pub struct Vgg16 {
    pub convs: Vec<ConvParams>,
}

impl Vgg16 {
    /// Reads `blockB_convC/kernel` and `/bias` for all 13 layers, checking
    /// every key, shape and value.
    pub fn load_npz(path: &Path) -> Result<Vgg16, WeightsError> {
        let mut npz = NpzIn::open(path)?;
        let convs = convs()
            .map(|(_, name, cin, cout)| npz.conv(name, cin, cout))
            .collect::<Result<_, _>>()?;
        Ok(Vgg16 { convs })
    }

    /// Writes the weights as `.npz` (uncompressed), via a temporary file
    /// renamed into place when complete.
    pub fn save_npz(&self, path: &Path) -> Result<(), WeightsError> {
        crate::atomic_write(path, |f| {
            let mut npz = NpzOut::new(f);
            npz.convs(convs().map(|(_, name, _, _)| name.to_string()).zip(&self.convs))?;
            npz.finish()
        })
        .map_err(|e| WeightsError::Write {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// block5's parameters (what stage 2 trains).
    pub fn block5(&self) -> &[ConvParams] {
        &self.convs[BLOCK5_CONVS]
    }

    /// This base with block5 replaced.
    pub fn with_block5(&self, block5: &[ConvParams]) -> Vgg16 {
        let mut b = self.clone();
        b.convs[BLOCK5_CONVS].clone_from_slice(block5);
        b
    }

    /// SHA-256 over the raw little-endian f32 bytes (C order, Keras layout)
    /// of the 26 arrays: kernel then bias, block1_conv1 .. block5_conv3.
    /// Independent of the container (an npz rewritten elsewhere matches).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for p in &self.convs {
            for v in p.w.iter().chain(p.b.iter()) {
                h.update(v.to_le_bytes());
            }
        }
        crate::data::fetch::hex(&h.finalize())
    }

    /// Value at `key` ("blockB_convC/kernel" or ".../bias") and index.
    pub fn probe(&self, key: &str, idx: &[usize]) -> Option<f32> {
        let (name, what) = key.split_once('/')?;
        let ci = convs().position(|(_, n, _, _)| n == name)?;
        let p = &self.convs[ci];
        match (what, idx) {
            ("kernel", [a, b, c, d]) => p.w.get([*a, *b, *c, *d]).copied(),
            ("bias", [i]) => p.b.get(*i).copied(),
            _ => None,
        }
    }

    /// Parameters of the conv layer at `layer` (an index into [`LAYERS`]).
    pub fn conv_at(&self, layer: usize) -> &ConvParams {
        &self.convs[conv_index(layer)]
    }

    /// Runs LAYERS[range] on `x` (N, H, W, C), calling `tap(index, output)`
    /// after each layer. Returns the last output. (One call; loops over
    /// batches should [`Vgg16::prepare`] once instead.)
    pub fn forward_range(
        &self,
        x: Array4<f32>,
        range: std::ops::Range<usize>,
        tap: &mut dyn FnMut(usize, ArrayView4<f32>),
    ) -> Array4<f32> {
        self.prepare().forward_range(x, range, tap)
    }

    /// The whole base plus global average pooling: (N, S, S, 3) -> (N, 512).
    pub fn features(&self, x: Array4<f32>) -> Array2<f32> {
        self.prepare().features(x)
    }

    /// The base ready for many batches: each conv kernel is packed for the
    /// direct kernel or transformed for Winograd the first time a batch
    /// needs it, then reused.
    pub fn prepare(&self) -> Prepared<'_> {
        self.prepare_with(Dispatch::global())
    }

    /// [`Vgg16::prepare`] with a chosen dispatch (tests run the whole base
    /// on every path this CPU has).
    pub fn prepare_with(&self, dispatch: Dispatch) -> Prepared<'_> {
        Prepared {
            model: self,
            dispatch,
            packed: (0..self.convs.len())
                .map(|_| (OnceLock::new(), OnceLock::new()))
                .collect(),
            pool: BufferPool::new(SPARE_ACTIVATIONS),
        }
    }
}

/// [`Vgg16`] with its conv kernels prepared once for the path the dispatch
/// picks (`tensor::direct` panels or `tensor::winograd` transforms), lazily,
/// layer by layer: 4x4 and smaller images (tap classes) never pack. Packing a
/// block5 kernel takes about 1.3 ms, a quarter of that layer's forward at
/// 224 px and batch 1. It borrows the weights, so they cannot change while
/// prepared copies exist. Layer outputs are written into buffers the pass
/// freed (this batch's or the last one's; see [`crate::tensor::pool`]),
/// so after the first batch the pass takes no fresh pages.
pub struct Prepared<'a> {
    model: &'a Vgg16,
    dispatch: Dispatch,
    /// Per conv layer: (direct, Winograd).
    packed: Vec<(OnceLock<PreparedKernel>, OnceLock<PreparedKernel>)>,
    pool: BufferPool,
}

/// Spare activation buffers a [`Prepared`] keeps: a layer's input and
/// output are the two live ones, the batch's input a third (two 205 MB
/// and one 9.6 MB buffer at 224 px, batch 16).
const SPARE_ACTIVATIONS: usize = 3;

impl Prepared<'_> {
    /// As [`Vgg16::forward_range`]. Every output but the last is written
    /// into a spare buffer of the pool; the last is a fresh array of its
    /// own size (callers keep it).
    pub fn forward_range(
        &self,
        x: Array4<f32>,
        range: std::ops::Range<usize>,
        tap: &mut dyn FnMut(usize, ArrayView4<f32>),
    ) -> Array4<f32> {
        self.forward_layers(x, range, &|_| true, tap)
    }

    /// As [`Prepared::forward_range`], except that a conv layer whose
    /// output `keep(layer)` does not ask for and whose next layer (in
    /// `range`) is a max-pool runs fused with it when its path is the
    /// direct kernel or Winograd ([`PreparedKernel::run`] with `pool`: the
    /// full-size output never reaches memory); `tap` then sees the pool's
    /// output only. Same values, bit for bit.
    pub fn forward_layers(
        &self,
        x: Array4<f32>,
        range: std::ops::Range<usize>,
        keep: &dyn Fn(usize) -> bool,
        tap: &mut dyn FnMut(usize, ArrayView4<f32>),
    ) -> Array4<f32> {
        let Some(last) = range.end.checked_sub(1).filter(|&l| l >= range.start) else {
            return x;
        };
        let (mut dim, len, standard) = (x.dim(), x.len(), x.is_standard_layout());
        // The input's own buffer when it is one plain run from its start.
        let mut cur = match standard {
            true => match x.into_raw_vec_and_offset() {
                (v, Some(0)) => v,
                // A slice of a larger buffer (or empty: no offset).
                (v, o) => v[o.unwrap_or(0)..][..len].to_vec(),
            },
            false => x.iter().copied().collect(),
        };
        // Where the current activation starts in `cur`: pool buffers are
        // used from their first 64-byte boundary (whole-line rows for the
        // streaming stores of `conv3x3_direct`).
        let mut at = 0;
        let mut layers = range.clone();
        while let Some(mut i) = layers.next() {
            let (n, h, w, c) = dim;
            let xv = ArrayView4::from_shape(dim, &cur[at..at + n * h * w * c]).expect("sized");
            let conv = matches!(LAYERS[i].kind, Kind::Conv { .. }).then(|| conv_index(i));
            // This conv and the max-pool after it in one step.
            let fused = conv.is_some() && {
                i + 1 < range.end
                    && LAYERS[i + 1].kind == Kind::Pool
                    && !keep(i)
                    && h % 2 == 0
                    && w % 2 == 0
                    && matches!(self.path(h, w, c), ConvPath::Direct(_) | ConvPath::Winograd(_))
            };
            let out_dim = match conv {
                Some(ci) if fused => (n, h / 2, w / 2, self.model.convs[ci].w.dim().3),
                Some(ci) => (n, h, w, self.model.convs[ci].w.dim().3),
                None => (n, h / 2, w / 2, c),
            };
            if fused {
                // The pool's index: its output is this step's.
                layers.next();
                i += 1;
            }
            let len = out_dim.0 * out_dim.1 * out_dim.2 * out_dim.3;
            const PAD: usize = 64 / std::mem::size_of::<f32>();
            let mut y = if i == last {
                vec![0.0; len]
            } else {
                self.pool.take(len + PAD)
            };
            let y_at = if i == last {
                0
            } else {
                y.as_ptr().align_offset(64).min(PAD)
            };
            let out = &mut y[y_at..y_at + len];
            match conv {
                Some(ci) if fused => self.conv_pool(ci, xv, out),
                Some(ci) => self.conv(ci, xv, out),
                None => maxpool2x2_infer_into(xv, out),
            }
            self.pool.give(std::mem::replace(&mut cur, y));
            (dim, at) = (out_dim, y_at);
            tap(i, ArrayView4::from_shape(dim, &cur[at..at + len]).expect("sized"));
        }
        Array4::from_shape_vec(dim, cur).expect("the last output is a buffer of its own size")
    }

    /// The path a conv layer takes on an (h, w, cin) input.
    fn path(&self, h: usize, w: usize, cin: usize) -> ConvPath {
        self.dispatch.path(ConvAlgo::Auto, h, w, cin)
    }

    /// Conv layer `ci` (of the 13) of `x`, + bias, ReLU, then the 2x2
    /// max-pool, into `out`, on the direct kernel or Winograd (the caller
    /// checked its path).
    fn conv_pool(&self, ci: usize, x: ArrayView4<f32>, out: &mut [f32]) {
        let p = &self.model.convs[ci];
        let dims = x.dim();
        let path = self.path(dims.1, dims.2, dims.3);
        let slot = match path {
            ConvPath::Direct(_) => &self.packed[ci].0,
            ConvPath::Winograd(_) => &self.packed[ci].1,
            ConvPath::Im2col | ConvPath::TapClasses => unreachable!("conv_pool on the {} path", path.name()),
        };
        let k = slot.get_or_init(|| PreparedKernel::new(path, p.w.view()).expect("has a prepared form"));
        let x = x.as_standard_layout();
        // SAFETY: the kernels only write initialised f32 values through it.
        let o = unsafe { &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
        let bias = p.b.as_slice().expect("a plain bias vector");
        k.run(x.as_slice().expect("standard layout"), dims, Some(bias), true, true, o);
    }

    /// Conv layer `ci` (of the 13) of `x`, + bias, ReLU, into `out`.
    fn conv(&self, ci: usize, x: ArrayView4<f32>, out: &mut [f32]) {
        let p = &self.model.convs[ci];
        let (n, h, w, cin) = x.dim();
        let path = self.path(h, w, cin);
        let slot = match path {
            ConvPath::Direct(_) => Some(&self.packed[ci].0),
            ConvPath::Winograd(_) => Some(&self.packed[ci].1),
            ConvPath::Im2col | ConvPath::TapClasses => None,
        };
        match slot {
            Some(slot) => {
                let k = slot.get_or_init(|| PreparedKernel::new(path, p.w.view()).expect("has a prepared form"));
                conv3x3_forward_prepared_into(x, k, Some(p.b.view()), true, out);
            }
            None => {
                let out = ArrayViewMut2::from_shape((n * h * w, p.w.dim().3), out).expect("sized");
                conv3x3_forward_path(path, x, p.w.view(), Some(p.b.view()), true, out);
            }
        }
    }

    /// As [`Vgg16::features`].
    pub fn features(&self, x: Array4<f32>) -> Array2<f32> {
        let y = self.forward_layers(x, 0..LAYERS.len(), &|_| false, &mut |_, _| {});
        gap_forward(y.view())
    }
}

/// Index among the 13 convs of the conv layer at `layer` in [`LAYERS`].
fn conv_index(layer: usize) -> usize {
    LAYERS[..layer]
        .iter()
        .filter(|l| matches!(l.kind, Kind::Conv { .. }))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block5_is_named_one_way() {
        assert_eq!(LAYERS[BLOCK5_START - 1].name, "block4_pool");
        assert_eq!(conv_index(BLOCK5_START), BLOCK5_CONVS.start);
        assert_eq!(BLOCK5_CONVS.end, convs().count());
        let names: Vec<_> = block5_names().collect();
        assert_eq!(names, ["block5_conv1", "block5_conv2", "block5_conv3"]);
        let from_layers: Vec<_> = LAYERS[BLOCK5_START..]
            .iter()
            .filter(|l| l.name.contains("conv"))
            .map(|l| l.name)
            .collect();
        assert_eq!(names, from_layers);
    }
}
