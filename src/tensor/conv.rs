//! 3x3, stride 1, "same" convolution over NHWC tensors: the entry points
//! every caller uses, the im2col tiles + SGEMM path, tap classes for small
//! images, and the backward pass.
//!
//! Which path runs a layer (Winograd, the direct kernel, im2col, tap
//! classes) and on which ISA is decided in one place,
//! [`crate::tensor::dispatch`]; [`conv3x3_forward_path`] runs a named path
//! (tests and benchmarks compare them), [`PreparedKernel`] keeps a layer's
//! packed or transformed kernel for many batches.
//!
//! Layouts:
//! - input `x` (N, H, W, Cin), output (N, H, W, Cout);
//! - kernel `w` in Keras layout (3, 3, Cin, Cout), which is, without a copy,
//!   the GEMM right-hand matrix (9*Cin, Cout): row (ky*3 + kx)*Cin + ci;
//! - an im2col row for output pixel (n, y, x) is 9 runs of Cin channels, the
//!   input pixels (y+ky-1, x+kx-1) in (ky, kx) order, zeros off the edge.
//!
//! im2col forward: out (P, Cout) = col (P, 9*Cin) x W (9*Cin, Cout), then bias and
//! ReLU fused on the tile while it is still in cache. The P output pixels of
//! a tile are consecutive in NHWC order, so the tile is a row block of the
//! output matrix (N*H*W, Cout). Tiles are sized from the shape alone, each
//! one built and multiplied on one thread: scratch stays at most
//! [`COL_TILE_BYTES`] per thread at any image size and batch, and results do
//! not depend on the thread count.
//!
//! Backward (given dZ, the gradient at the pre-activation output):
//! - dW (9*Cin, Cout) = col^T (9*Cin, P) x dZ (P, Cout), summed over pixel
//!   chunks in a fixed order;
//! - db (Cout) = sum of dZ over pixels;
//! - dX = conv3x3(dZ, W') with W'[ky, kx, co, ci] = W[2-ky, 2-kx, ci, co]:
//!   the transposed convolution of a 3x3 "same" conv is itself a 3x3 "same"
//!   conv with the kernel flipped and its channel axes swapped, so dX reuses
//!   the bounded, tiled forward path instead of a col2im scatter.

use crate::tensor::direct::{conv3x3_direct, conv3x3_direct_pool2, PackedKernel};
use crate::tensor::dispatch::Dispatch;
pub use crate::tensor::dispatch::{ConvAlgo, ConvPath, SMALL_SIDE};
use crate::tensor::gemm::{sgemm, sgemm_serial, split_tiles, Backend};
pub use crate::tensor::im2col::im2col;
use crate::tensor::winograd::{conv3x3_winograd, conv3x3_winograd_dw, conv3x3_winograd_pool2, WinogradKernel};
use ndarray::{s, Array1, Array2, Array4, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// Upper bound on one im2col tile (bytes). Each thread holds at most one.
pub const COL_TILE_BYTES: usize = 2 << 20;
/// Upper bound on the im2col chunk of the dW pass (bytes; one chunk, built
/// by all threads, then one parallel GEMM). Larger than a forward tile: dW's
/// GEMM reduces over the chunk's pixels, and short reductions both run
/// slowly and re-read and re-write all of dW once per chunk.
pub const DW_CHUNK_BYTES: usize = 32 << 20;
/// Smallest pixel tile worth its own GEMM call (the packed kernel is reused
/// over a tile's rows, so short tiles pay the packing again and again).
const MIN_TILE_PIXELS: usize = 256;
/// Largest pixel tile: very tall, thin GEMMs (the RGB input layer) run
/// better cut into pieces.
const MAX_TILE_PIXELS: usize = 2048;
/// Jobs a layer is cut into at least, when its shape allows (a property of
/// the shape, never of the thread pool).
const TARGET_JOBS: usize = 4;
/// Narrowest output-channel slice a job may take when pixels run short.
const MIN_TILE_COUT: usize = 64;

/// How one conv layer is cut into jobs: `pixels` output pixels by `couts`
/// output channels. Depends only on the shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPlan {
    pub pixels: usize,
    pub couts: usize,
}

impl ConvPlan {
    pub fn new(m: usize, cin: usize, cout: usize) -> ConvPlan {
        let row_bytes = 9 * cin.max(1) * std::mem::size_of::<f32>();
        let max_rows = (COL_TILE_BYTES / row_bytes).clamp(MIN_TILE_PIXELS, MAX_TILE_PIXELS);
        let mut tiles = m.div_ceil(max_rows).max(1);
        // More, smaller pixel tiles to keep the target job count, but not
        // below MIN_TILE_PIXELS rows.
        let want = TARGET_JOBS.min(m.div_ceil(MIN_TILE_PIXELS)).max(1);
        tiles = tiles.max(want);
        let pixels = m.div_ceil(tiles).max(1);
        let tiles = m.div_ceil(pixels).max(1);
        // Still short of jobs: split the output channels too.
        let mut cout_parts = 1;
        if tiles < TARGET_JOBS {
            cout_parts = TARGET_JOBS.div_ceil(tiles).min(cout.div_ceil(MIN_TILE_COUT)).max(1);
        }
        let couts = cout.div_ceil(cout_parts).max(1);
        ConvPlan { pixels, couts }
    }
}

/// Shape checks shared by forward and backward; returns (n, h, w, cin, cout).
fn dims(x: &ArrayView4<f32>, w: &ArrayView4<f32>) -> (usize, usize, usize, usize, usize) {
    let (n, h, wd, cin) = x.dim();
    let (kh, kw, wcin, cout) = w.dim();
    assert_eq!((kh, kw), (3, 3), "conv3x3: kernel must be 3x3, is {kh}x{kw}");
    assert_eq!(wcin, cin, "conv3x3: input has {cin} channels, kernel expects {wcin}");
    (n, h, wd, cin, cout)
}

/// Forward: `x` (N, H, W, Cin) * `w` (3, 3, Cin, Cout) + `bias` (Cout),
/// then ReLU when `relu`. Returns (N, H, W, Cout). The path is the
/// dispatch's for the layer's shape ([`Dispatch::path`]), whatever the
/// batch, so an image gets the same numbers in any batch (inference:
/// `evaluate`, `predict`, the stage-end test).
pub fn conv3x3_forward(
    x: ArrayView4<f32>,
    w: ArrayView4<f32>,
    bias: Option<ArrayView1<f32>>,
    relu: bool,
) -> Array4<f32> {
    let (_, h, wd, cin, _) = dims(&x, &w);
    conv3x3_forward_on(Dispatch::global().path(ConvAlgo::Auto, h, wd, cin), x, w, bias, relu)
}

/// [`conv3x3_forward`] for one training step (block5's forward and dX,
/// whose weights change every step): the path also looks at the batch
/// ([`Dispatch::path_unprepared`]), since the kernel is transformed for
/// this call alone; a small part of a batch (data parallelism,
/// `--accumulate`) then skips Winograd's fixed cost.
pub fn conv3x3_forward_step(
    x: ArrayView4<f32>,
    w: ArrayView4<f32>,
    bias: Option<ArrayView1<f32>>,
    relu: bool,
) -> Array4<f32> {
    let (n, h, wd, cin, _) = dims(&x, &w);
    let path = Dispatch::global().path_unprepared(ConvAlgo::Auto, n, h, wd, cin);
    conv3x3_forward_on(path, x, w, bias, relu)
}

fn conv3x3_forward_on(
    path: ConvPath,
    x: ArrayView4<f32>,
    w: ArrayView4<f32>,
    bias: Option<ArrayView1<f32>>,
    relu: bool,
) -> Array4<f32> {
    let (n, h, wd, _, cout) = dims(&x, &w);
    if let Some(k) = PreparedKernel::new(path, w) {
        return conv3x3_forward_prepared(x, &k, bias, relu);
    }
    let mut out = Array4::<f32>::zeros((n, h, wd, cout));
    {
        let m = n * h * wd;
        let out2 = out
            .view_mut()
            .into_shape_with_order((m, cout))
            .expect("fresh array is contiguous");
        conv3x3_forward_path(path, x, w, bias, relu, out2);
    }
    out
}

/// A layer's kernel transformed once for a path that has a prepared form
/// (the direct kernel's panels, Winograd's U), reused across batches (see
/// [`crate::model::vgg::Prepared`]).
pub enum PreparedKernel {
    Direct(PackedKernel),
    Winograd(WinogradKernel),
}

impl PreparedKernel {
    /// The prepared kernel of `w` (3, 3, Cin, Cout) for `path`, or None when
    /// the path runs from the plain kernel (im2col, tap classes).
    pub fn new(path: ConvPath, w: ArrayView4<f32>) -> Option<PreparedKernel> {
        match path {
            ConvPath::Direct(isa) => Some(PreparedKernel::Direct(PackedKernel::from_keras(isa, w))),
            ConvPath::Winograd(isa) => Some(PreparedKernel::Winograd(WinogradKernel::from_keras(isa, w))),
            ConvPath::Im2col | ConvPath::TapClasses => None,
        }
    }

    /// The path this kernel runs.
    pub fn path(&self) -> ConvPath {
        match self {
            PreparedKernel::Direct(k) => ConvPath::Direct(k.isa),
            PreparedKernel::Winograd(k) => ConvPath::Winograd(k.isa),
        }
    }

    /// `out` (N*H*W, Cout) = conv3x3(x) + bias, ReLU when `relu`; every
    /// element written once, none read. With `pool`, followed by a 2x2
    /// max-pool, fused ([`conv3x3_direct_pool2`], [`conv3x3_winograd_pool2`]):
    /// `out` is then (N*H/2*W/2, Cout), H and W even; the same bits as the
    /// conv then `maxpool2x2`.
    pub fn run(
        &self,
        x: &[f32],
        dims: (usize, usize, usize, usize),
        bias: Option<&[f32]>,
        relu: bool,
        pool: bool,
        out: &mut [std::mem::MaybeUninit<f32>],
    ) {
        match (self, pool) {
            (PreparedKernel::Direct(k), false) => conv3x3_direct(x, dims, k, bias, relu, out),
            (PreparedKernel::Direct(k), true) => conv3x3_direct_pool2(x, dims, k, bias, relu, out),
            (PreparedKernel::Winograd(k), false) => conv3x3_winograd(x, dims, k, bias, relu, out),
            (PreparedKernel::Winograd(k), true) => conv3x3_winograd_pool2(x, dims, k, bias, relu, out),
        }
    }

    fn channels(&self) -> (usize, usize) {
        match self {
            PreparedKernel::Direct(k) => (k.k / 9, k.cout),
            PreparedKernel::Winograd(k) => (k.cin, k.cout),
        }
    }
}

/// A layer's prepared kernel kept across training steps: block5's weights
/// change after every step, its buffers (9 MB a layer for the direct
/// kernel, 36 MB for Winograd's U) need not. Refilling them in place saves
/// the OS zeroing fresh pages for every new allocation, which was a third
/// of the cost of preparing a kernel.
#[derive(Default)]
pub struct KernelSlot(Option<PreparedKernel>);

impl KernelSlot {
    /// Prepares `w` (3, 3, Cin, Cout) for `path` in this slot, reusing its
    /// buffers when it holds a kernel of the same path and shape; with
    /// `flipped`, the kernel of the transposed convolution (dX's, Cout ->
    /// Cin). Returns None, and empties the slot, for paths without a
    /// prepared form (im2col, tap classes).
    pub fn prepare(&mut self, path: ConvPath, w: ArrayView4<f32>, flipped: bool) -> Option<&PreparedKernel> {
        let (_, _, cin, cout) = w.dim();
        let io = if flipped { (cout, cin) } else { (cin, cout) };
        match self.0.as_mut() {
            Some(k) if k.path() == path && k.channels() == io => match (k, flipped) {
                (PreparedKernel::Direct(k), false) => k.refill(w),
                (PreparedKernel::Direct(k), true) => k.refill_flipped(w),
                (PreparedKernel::Winograd(k), false) => k.refill(w),
                (PreparedKernel::Winograd(k), true) => k.refill_flipped(w),
            },
            _ => {
                // Both flipped forms read `w` directly: no flipped copy.
                self.0 = match (path, flipped) {
                    (ConvPath::Direct(isa), true) => {
                        Some(PreparedKernel::Direct(PackedKernel::from_keras_flipped(isa, w)))
                    }
                    (ConvPath::Winograd(isa), true) => {
                        Some(PreparedKernel::Winograd(WinogradKernel::from_keras_flipped(isa, w)))
                    }
                    (_, true) => None,
                    (_, false) => PreparedKernel::new(path, w),
                }
            }
        }
        self.0.as_ref()
    }

    /// The kernel last prepared, if its path has a prepared form.
    pub fn get(&self) -> Option<&PreparedKernel> {
        self.0.as_ref()
    }
}

/// [`conv3x3_forward`] with a prepared kernel; `x` is (N, H, W, Cin) with
/// Cin the kernel's, on the path and ISA it was prepared for.
pub fn conv3x3_forward_prepared(
    x: ArrayView4<f32>,
    kernel: &PreparedKernel,
    bias: Option<ArrayView1<f32>>,
    relu: bool,
) -> Array4<f32> {
    let (n, h, wd, cin) = x.dim();
    let (kcin, cout) = kernel.channels();
    assert_eq!(kcin, cin, "conv3x3: input has {cin} channels, kernel expects {kcin}");
    // Both kernels write every output once: no zero-fill pass (at 224 px
    // that memset was 3% of a forward pass).
    let mut out = Array4::<f32>::uninit((n, h, wd, cout));
    let o = out.as_slice_mut().expect("fresh array is contiguous");
    run_prepared(x, kernel, bias, relu, o);
    // SAFETY: both kernels wrote every element (each covers every output
    // pixel and channel exactly once; tests pre-fill with NaN to check).
    unsafe { out.assume_init() }
}

/// [`conv3x3_forward_prepared`] into `out`, the (N, H, W, Cout) output as
/// a flat slice, which is overwritten (never read): a buffer reused across
/// layers and batches (see [`super::pool`]).
pub fn conv3x3_forward_prepared_into(
    x: ArrayView4<f32>,
    kernel: &PreparedKernel,
    bias: Option<ArrayView1<f32>>,
    relu: bool,
    out: &mut [f32],
) {
    // SAFETY: the kernels only write initialised f32 values through it.
    let o = unsafe { &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
    run_prepared(x, kernel, bias, relu, o);
}

fn run_prepared(
    x: ArrayView4<f32>,
    kernel: &PreparedKernel,
    bias: Option<ArrayView1<f32>>,
    relu: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let (n, h, wd, cin) = x.dim();
    let (kcin, cout) = kernel.channels();
    assert_eq!(kcin, cin, "conv3x3: input has {cin} channels, kernel expects {kcin}");
    assert_eq!(
        out.len(),
        n * h * wd * cout,
        "conv3x3: output holds {} floats, expected {n}x{h}x{wd}x{cout}",
        out.len()
    );
    let x = x.as_standard_layout();
    let bias = bias.map(|b| b.to_vec());
    let xs = x.as_slice().expect("standard layout");
    kernel.run(xs, (n, h, wd, cin), bias.as_deref(), relu, false, out);
}

/// [`conv3x3_forward`] into a caller's (N*H*W, Cout) matrix, which is
/// overwritten (never read), on exactly the given path, whatever the
/// dispatch would pick (tests run every path this way). Panics when this
/// CPU cannot run `path`'s ISA, or on `TapClasses` for an image larger than
/// [`SMALL_SIDE`].
pub fn conv3x3_forward_path(
    path: ConvPath,
    x: ArrayView4<f32>,
    w: ArrayView4<f32>,
    bias: Option<ArrayView1<f32>>,
    relu: bool,
    mut out: ArrayViewMut2<f32>,
) {
    let (n, h, wd, cin, cout) = dims(&x, &w);
    let m = n * h * wd;
    assert_eq!(out.dim(), (m, cout), "conv3x3: output must be ({m}, {cout})");
    if let Some(b) = &bias {
        assert_eq!(b.len(), cout, "conv3x3: bias has {} entries, expected {cout}", b.len());
    }
    if m == 0 || cout == 0 {
        return;
    }
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let w = w.as_standard_layout();
    // (9*Cin, Cout): the Keras kernel, reshaped without a copy.
    let w2 = w
        .view()
        .into_shape_with_order((9 * cin, cout))
        .expect("standard layout");
    let bias = bias.map(|b| b.to_owned());
    let b = bias.as_ref().map(|b| b.as_slice().expect("owned"));
    match path {
        ConvPath::Direct(_) | ConvPath::Winograd(_) => {
            let k = PreparedKernel::new(path, w.view()).expect("direct and Winograd have a prepared form");
            if out.is_standard_layout() {
                let o = out.as_slice_mut().expect("standard layout");
                // SAFETY: the kernels only write initialised f32 values through it.
                let o = unsafe { &mut *(o as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
                k.run(xs, (n, h, wd, cin), b, relu, false, o);
            } else {
                let y = conv3x3_forward_prepared(x.view(), &k, bias.as_ref().map(|b| b.view()), relu);
                out.assign(
                    &y.view()
                        .into_shape_with_order((m, cout))
                        .expect("fresh array is contiguous"),
                );
            }
            return;
        }
        ConvPath::TapClasses => {
            let classes = tap_classes(h, wd).unwrap_or_else(|| {
                panic!("conv3x3: tap classes serve images up to {SMALL_SIDE}x{SMALL_SIDE}, not {h}x{wd}")
            });
            conv_small_into(xs, (n, h, wd, cin), Kernel::Forward(w2), b, relu, &classes, out);
            return;
        }
        ConvPath::Im2col => {}
    }

    let plan = ConvPlan::new(m, cin, cout);
    let jobs = split_tiles(out, plan.pixels, plan.couts);
    jobs.into_par_iter()
        .for_each_init(Vec::<f32>::new, |col, (p0, c0, mut tile)| {
            let (rows, cols) = tile.dim();
            col.resize(rows * 9 * cin, 0.0);
            im2col(xs, h, wd, cin, p0, rows, col);
            let col_v = ArrayView2::from_shape((rows, 9 * cin), &col[..rows * 9 * cin]).expect("sized above");
            // (rows, cols) = (rows, 9*Cin) x (9*Cin, cols)
            sgemm_serial(
                Backend::auto(),
                col_v,
                w2.slice(s![.., c0..c0 + cols]),
                tile.view_mut(),
                false,
            );
            let b = bias.as_ref().map(|b| &b.as_slice().expect("owned")[c0..c0 + cols]);
            bias_relu(tile, b, relu);
        });
}

// ------------------------------------------------------------ small images
//
// On a small image most 3x3 taps fall on the zero padding: at 2x2, 20 of an
// output pixel's 36 taps (55%), at 4x4 30%. im2col would multiply those
// zeros. Instead, output pixels are grouped into classes by which taps land
// inside the image (corners, edges, interior); a class's im2col holds only
// its valid taps, ky-major, so for each valid ky the kx-run of taps is one
// contiguous column block of the class's col and one contiguous row block of
// W (9*Cin, Cout). A class's output is the sum over its valid ky of one GEMM.

/// One class of output pixels: rows `ys` x columns `xs`, whose valid taps
/// are `ky` x `kx`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapClass {
    pub ys: Vec<usize>,
    pub xs: Vec<usize>,
    pub ky: std::ops::Range<usize>,
    pub kx: std::ops::Range<usize>,
}

impl TapClass {
    fn taps(&self) -> usize {
        self.ky.len() * self.kx.len()
    }
}

/// Positions 0..len grouped by their valid tap range along one axis.
fn axis_classes(len: usize) -> Vec<(Vec<usize>, std::ops::Range<usize>)> {
    let mut out: Vec<(Vec<usize>, std::ops::Range<usize>)> = Vec::new();
    for p in 0..len {
        // iy = p + k - 1 must lie in 0..len.
        let r = (1usize.saturating_sub(p))..(len + 1 - p).min(3);
        match out.iter_mut().find(|(_, rr)| *rr == r) {
            Some((ps, _)) => ps.push(p),
            None => out.push((vec![p], r)),
        }
    }
    out
}

/// The tap classes of an h x w image, or None when it is not small.
pub fn tap_classes(h: usize, w: usize) -> Option<Vec<TapClass>> {
    if h > SMALL_SIDE || w > SMALL_SIDE || h == 0 || w == 0 {
        return None;
    }
    let mut out = Vec::new();
    for (ys, ky) in axis_classes(h) {
        for (xs, kx) in axis_classes(w) {
            out.push(TapClass {
                ys: ys.clone(),
                xs,
                ky: ky.clone(),
                kx,
            });
        }
    }
    Some(out)
}

/// Output pixel indices (NHWC order) of a class over a batch of n.
fn class_pixels(c: &TapClass, n: usize, h: usize, w: usize) -> Vec<usize> {
    let mut v = Vec::with_capacity(n * c.ys.len() * c.xs.len());
    for img in 0..n {
        for &y in &c.ys {
            for &x in &c.xs {
                v.push((img * h + y) * w + x);
            }
        }
    }
    v
}

/// The class's compact im2col: (pixels, taps*Cin), taps ky-major.
fn class_col(xs: &[f32], dims: (usize, usize, usize, usize), c: &TapClass, pixels: &[usize]) -> Vec<f32> {
    let (_, h, w, cin) = dims;
    let k = c.taps() * cin;
    let mut col = vec![0.0f32; pixels.len() * k];
    for (row, &g) in col.chunks_exact_mut(k).zip(pixels) {
        let (img, rem) = (g / (h * w), g % (h * w));
        let (y, x) = (rem / w, rem % w);
        let mut o = 0;
        for ky in c.ky.clone() {
            // The kx-run of input pixels is contiguous in NHWC.
            let iy = y + ky - 1;
            let ix0 = x + c.kx.start - 1;
            let src = ((img * h + iy) * w + ix0) * cin;
            let len = c.kx.len() * cin;
            row[o..o + len].copy_from_slice(&xs[src..src + len]);
            o += len;
        }
    }
    col
}

/// The kernel a small-image conv multiplies by.
#[derive(Clone, Copy)]
enum Kernel<'a> {
    /// The layer's own (9*Cin, Cout).
    Forward(ArrayView2<'a, f32>),
    /// The transposed convolution of a layer with this (9*Cout', Cin')
    /// kernel (for dX): tap (ky, kx) uses W[2-ky, 2-kx]^T, read through a
    /// transposed view, so no flipped copy of the kernel is ever made.
    Transposed(ArrayView2<'a, f32>),
}

impl Kernel<'_> {
    fn cout(&self) -> usize {
        match self {
            Kernel::Forward(w2) => w2.ncols(),
            Kernel::Transposed(w2) => w2.nrows() / 9,
        }
    }
}

fn conv_small_into(
    xs: &[f32],
    dims: (usize, usize, usize, usize),
    kernel: Kernel,
    bias: Option<&[f32]>,
    relu: bool,
    classes: &[TapClass],
    mut out: ArrayViewMut2<f32>,
) {
    let (n, h, w, cin) = dims;
    let cout = kernel.cout();
    // Jobs: (class, output-channel slice); enough of them for the pool.
    let parts = TARGET_JOBS
        .div_ceil(classes.len())
        .min(cout.div_ceil(MIN_TILE_COUT))
        .max(1);
    let tc = cout.div_ceil(parts);
    let jobs: Vec<(usize, usize)> = (0..classes.len())
        .flat_map(|ci| (0..cout).step_by(tc).map(move |c0| (ci, c0)))
        .collect();
    let pixels: Vec<Vec<usize>> = classes.iter().map(|c| class_pixels(c, n, h, w)).collect();
    let results: Vec<Array2<f32>> = jobs
        .par_iter()
        .map(|&(ci, c0)| {
            let c = &classes[ci];
            let cols = tc.min(cout - c0);
            let col = class_col(xs, dims, c, &pixels[ci]);
            let k = c.taps() * cin;
            let col = ArrayView2::from_shape((pixels[ci].len(), k), &col).expect("sized");
            let mut res = Array2::<f32>::zeros((pixels[ci].len(), cols));
            let run = c.kx.len() * cin;
            match kernel {
                Kernel::Forward(w2) => {
                    for (j, ky) in c.ky.clone().enumerate() {
                        let r0 = (ky * 3 + c.kx.start) * cin;
                        // (P, cols) += (P, |kx|*Cin) x (|kx|*Cin, cols)
                        sgemm_serial(
                            Backend::auto(),
                            col.slice(s![.., j * run..(j + 1) * run]),
                            w2.slice(s![r0..r0 + run, c0..c0 + cols]),
                            res.view_mut(),
                            j > 0,
                        );
                    }
                }
                Kernel::Transposed(w2) => {
                    let mut first = true;
                    for (j, ky) in c.ky.clone().enumerate() {
                        for (t, kx) in c.kx.clone().enumerate() {
                            // Tap (ky, kx) of the flipped kernel is the
                            // layer's tap (2-ky, 2-kx), transposed:
                            // (P, cols) += (P, Cin) x (Cin, cols).
                            let r0 = ((2 - ky) * 3 + (2 - kx)) * cout;
                            let a0 = j * run + t * cin;
                            sgemm_serial(
                                Backend::auto(),
                                col.slice(s![.., a0..a0 + cin]),
                                w2.slice(s![r0 + c0..r0 + c0 + cols, ..]).t(),
                                res.view_mut(),
                                !first,
                            );
                            first = false;
                        }
                    }
                }
            }
            res
        })
        .collect();
    for (&(ci, c0), res) in jobs.iter().zip(&results) {
        let cols = res.ncols();
        for (r, &g) in pixels[ci].iter().enumerate() {
            out.slice_mut(s![g, c0..c0 + cols]).assign(&res.row(r));
        }
    }
    bias_relu(out, bias, relu);
}

/// dW (9*Cin, Cout) for a small image, class by class: each valid-tap row
/// block of dW gets col_class[:, block]^T x dZ_class.
fn dw_small(
    xs: &[f32],
    dims: (usize, usize, usize, usize),
    dz2: ArrayView2<f32>,
    classes: &[TapClass],
    dw2: &mut Array2<f32>,
) {
    let (n, h, w, cin) = dims;
    let cout = dz2.ncols();
    for c in classes {
        let pixels = class_pixels(c, n, h, w);
        let col = class_col(xs, dims, c, &pixels);
        let col = ArrayView2::from_shape((pixels.len(), c.taps() * cin), &col).expect("sized");
        let mut dzc = Array2::<f32>::zeros((pixels.len(), cout));
        for (r, &g) in pixels.iter().enumerate() {
            dzc.row_mut(r).assign(&dz2.row(g));
        }
        let run = c.kx.len() * cin;
        for (j, ky) in c.ky.clone().enumerate() {
            let r0 = (ky * 3 + c.kx.start) * cin;
            // (|kx|*Cin, Cout) += (|kx|*Cin, P) x (P, Cout)
            sgemm(
                col.slice(s![.., j * run..(j + 1) * run]).t(),
                dzc.view(),
                dw2.slice_mut(s![r0..r0 + run, ..]),
                true,
            );
        }
    }
}

/// Adds `bias` to every row of `tile` and applies ReLU, in one pass.
fn bias_relu(mut tile: ArrayViewMut2<f32>, bias: Option<&[f32]>, relu: bool) {
    for mut row in tile.rows_mut() {
        let row = row.as_slice_mut().expect("tile rows are contiguous");
        match (bias, relu) {
            (Some(b), true) => row.iter_mut().zip(b).for_each(|(v, &bb)| *v = (*v + bb).max(0.0)),
            (Some(b), false) => row.iter_mut().zip(b).for_each(|(v, &bb)| *v += bb),
            (None, true) => row.iter_mut().for_each(|v| *v = v.max(0.0)),
            (None, false) => {}
        }
    }
}

/// Gradients of one conv layer.
#[derive(Debug, Clone)]
pub struct ConvGrads {
    /// (3, 3, Cin, Cout), Keras layout, like the kernel.
    pub dw: Array4<f32>,
    /// (Cout)
    pub db: Array1<f32>,
    /// (N, H, W, Cin), when asked for.
    pub dx: Option<Array4<f32>>,
}

/// The kernel of the transposed convolution: W'[ky, kx, co, ci] =
/// W[2-ky, 2-kx, ci, co], shape (3, 3, Cout, Cin).
pub fn flip_kernel(w: ArrayView4<f32>) -> Array4<f32> {
    let (_, _, cin, cout) = w.dim();
    let w = w.as_standard_layout();
    let ws = w.as_slice().expect("standard layout");
    let mut out = Array4::<f32>::zeros((3, 3, cout, cin));
    if out.is_empty() {
        return out;
    }
    // One tap per job; within it a (Cin, Cout) -> (Cout, Cin) transpose in
    // 32x32 blocks so reads and writes both stay in cache lines.
    const B: usize = 32;
    out.as_slice_mut()
        .expect("fresh")
        .par_chunks_mut(cout * cin)
        .enumerate()
        .for_each(|(tap, dst)| {
            let src = &ws[(8 - tap) * cin * cout..(9 - tap) * cin * cout];
            for c0 in (0..cin).step_by(B) {
                for o0 in (0..cout).step_by(B) {
                    for ci in c0..(c0 + B).min(cin) {
                        for co in o0..(o0 + B).min(cout) {
                            dst[co * cin + ci] = src[ci * cout + co];
                        }
                    }
                }
            }
        });
    out
}

/// Backward of [`conv3x3_forward`] given `dz` (N, H, W, Cout), the gradient
/// at the pre-activation output (apply [`crate::tensor::ops::relu_backward`]
/// first when the layer has a ReLU). `dx` is computed only when `need_dx`
/// (the lowest trainable layer skips it).
pub fn conv3x3_backward(x: ArrayView4<f32>, w: ArrayView4<f32>, dz: ArrayView4<f32>, need_dx: bool) -> ConvGrads {
    conv3x3_backward_prepared(x, w, dz, need_dx, None)
}

/// [`conv3x3_backward`] with dX's kernel already prepared (a
/// [`KernelSlot`] prepared `flipped` from `w`); without one, dX prepares
/// its own on the path the dispatch picks.
pub fn conv3x3_backward_prepared(
    x: ArrayView4<f32>,
    w: ArrayView4<f32>,
    dz: ArrayView4<f32>,
    need_dx: bool,
    dx_kernel: Option<&PreparedKernel>,
) -> ConvGrads {
    let (n, h, wd, cin, cout) = dims(&x, &w);
    assert_eq!(
        dz.dim(),
        (n, h, wd, cout),
        "conv3x3_backward: dz must be ({n}, {h}, {wd}, {cout})"
    );
    let m = n * h * wd;
    let k = 9 * cin;
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let dz_std = dz.as_standard_layout();
    let dz2 = dz_std.view().into_shape_with_order((m, cout)).expect("standard layout");

    // dW (9*Cin, Cout) = sum over pixel chunks of col^T (9*Cin, Pc) x dZ (Pc, Cout).
    let small = tap_classes(h, wd);
    let dzs = dz_std.as_slice().expect("standard layout");
    // dW's Winograd has no kernel transform but an output transform of the
    // same size (dU, 36 x Cin x Cout), so it follows the same rule by tiles.
    let winograd = match Dispatch::global().path_unprepared(ConvAlgo::Auto, n, h, wd, cin) {
        ConvPath::Winograd(isa) => Some(isa),
        _ => None,
    };
    // Zeroed only where it is summed into (9.4 MB for a 512 x 512 layer).
    let mut dw2 = match winograd {
        // The same algebra backwards: 36 GEMMs on transformed tiles.
        Some(isa) => Array2::from_shape_vec((k, cout), conv3x3_winograd_dw(isa, xs, (n, h, wd, cin), dzs, cout))
            .expect("(9*Cin, Cout)"),
        None => Array2::<f32>::zeros((k, cout)),
    };
    match (&small, winograd.is_none() && m > 0 && k > 0) {
        (_, false) => {} // Winograd's, above; or nothing to sum.
        (Some(classes), true) => dw_small(xs, (n, h, wd, cin), dz2, classes, &mut dw2),
        (None, true) => {
            let chunk_rows = (DW_CHUNK_BYTES / (k * std::mem::size_of::<f32>())).max(1).min(m);
            let mut col = vec![0.0f32; chunk_rows * k];
            const BUILD_ROWS: usize = 64;
            for (ci, p0) in (0..m).step_by(chunk_rows).enumerate() {
                let rows = chunk_rows.min(m - p0);
                col[..rows * k]
                    .par_chunks_mut(BUILD_ROWS * k)
                    .enumerate()
                    .for_each(|(bi, part)| im2col(xs, h, wd, cin, p0 + bi * BUILD_ROWS, part.len() / k, part));
                let col_v = ArrayView2::from_shape((rows, k), &col[..rows * k]).expect("sized above");
                sgemm(col_v.t(), dz2.slice(s![p0..p0 + rows, ..]), dw2.view_mut(), ci > 0);
            }
        }
    }
    let dw = dw2.into_shape_with_order((3, 3, cin, cout)).expect("contiguous");

    let db = column_sums(dz2);
    let dx = need_dx.then(|| {
        if let Some(k) = dx_kernel {
            assert_eq!(
                k.channels(),
                (cout, cin),
                "conv3x3_backward: dX kernel is not this layer's"
            );
            return conv3x3_forward_prepared(dz_std.view(), k, None, false);
        }
        match (
            &small,
            Dispatch::global().path_unprepared(ConvAlgo::Auto, n, h, wd, cout),
        ) {
            // Small images: the transposed conv reads W through transposed views.
            (Some(classes), ConvPath::TapClasses) => {
                let w = w.as_standard_layout();
                let w2 = w.view().into_shape_with_order((k, cout)).expect("standard layout");
                let mut dx = Array4::<f32>::zeros((n, h, wd, cin));
                let out = dx
                    .view_mut()
                    .into_shape_with_order((m, cin))
                    .expect("fresh array is contiguous");
                conv_small_into(dzs, (n, h, wd, cout), Kernel::Transposed(w2), None, false, classes, out);
                dx
            }
            // The direct kernel packs the flipped kernel straight from w.
            (_, ConvPath::Direct(isa)) => {
                let k = PreparedKernel::Direct(PackedKernel::from_keras_flipped(isa, w));
                conv3x3_forward_prepared(dz_std.view(), &k, None, false)
            }
            (_, ConvPath::Winograd(isa)) => {
                let k = PreparedKernel::Winograd(WinogradKernel::from_keras_flipped(isa, w));
                conv3x3_forward_prepared(dz_std.view(), &k, None, false)
            }
            (_, path) => {
                let wt = flip_kernel(w);
                conv3x3_forward_on(path, dz_std.view(), wt.view(), None, false)
            }
        }
    });
    ConvGrads { dw, db, dx }
}

/// Sum over rows of a (rows, cols) matrix, in fixed row blocks combined in
/// order, so the result does not depend on the thread count.
pub fn column_sums(a: ArrayView2<f32>) -> Array1<f32> {
    const BLOCK: usize = 256;
    let cols = a.ncols();
    let partials: Vec<Array1<f32>> = a
        .axis_chunks_iter(Axis(0), BLOCK)
        .into_par_iter()
        .map(|blk| blk.sum_axis(Axis(0)))
        .collect();
    partials.into_iter().fold(Array1::zeros(cols), |acc, p| acc + p)
}

/// FLOPs of a forward pass (2 per multiply-add, padding taps included).
pub fn forward_flops(n: usize, h: usize, w: usize, cin: usize, cout: usize) -> f64 {
    2.0 * (n * h * w) as f64 * (9 * cin) as f64 * cout as f64
}
