//! 3x3, stride 1, "same" convolution over NHWC tensors: im2col tiles + SGEMM.
//!
//! Layouts:
//! - input `x` (N, H, W, Cin), output (N, H, W, Cout);
//! - kernel `w` in Keras layout (3, 3, Cin, Cout), which is, without a copy,
//!   the GEMM right-hand matrix (9*Cin, Cout): row (ky*3 + kx)*Cin + ci;
//! - an im2col row for output pixel (n, y, x) is 9 runs of Cin channels, the
//!   input pixels (y+ky-1, x+kx-1) in (ky, kx) order, zeros off the edge.
//!
//! Forward: out (P, Cout) = col (P, 9*Cin) x W (9*Cin, Cout), then bias and
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

use crate::tensor::gemm::{sgemm, sgemm_serial, split_tiles, Backend};
use ndarray::{s, Array1, Array2, Array4, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// Upper bound on one im2col tile (bytes). Each thread holds at most one.
pub const COL_TILE_BYTES: usize = 2 << 20;
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
            cout_parts = TARGET_JOBS
                .div_ceil(tiles)
                .min(cout.div_ceil(MIN_TILE_COUT))
                .max(1);
        }
        let couts = cout.div_ceil(cout_parts).max(1);
        ConvPlan { pixels, couts }
    }
}

/// Shape checks shared by forward and backward; returns (n, h, w, cin, cout).
fn dims(x: &ArrayView4<f32>, w: &ArrayView4<f32>) -> (usize, usize, usize, usize, usize) {
    let (n, h, wd, cin) = x.dim();
    let (kh, kw, wcin, cout) = w.dim();
    assert_eq!(
        (kh, kw),
        (3, 3),
        "conv3x3: kernel must be 3x3, is {kh}x{kw}"
    );
    assert_eq!(
        wcin, cin,
        "conv3x3: input has {cin} channels, kernel expects {wcin}"
    );
    (n, h, wd, cin, cout)
}

/// Fills `col` (rows, 9*cin) with the im2col rows of output pixels
/// `p0 .. p0+rows` (NHWC order) of `x` (n, h, w, cin), zero padding 1.
pub fn im2col(x: &[f32], h: usize, w: usize, cin: usize, p0: usize, rows: usize, col: &mut [f32]) {
    let k = 9 * cin;
    debug_assert!(col.len() >= rows * k);
    for (r, row) in col[..rows * k].chunks_exact_mut(k).enumerate() {
        let g = p0 + r;
        let img = g / (h * w);
        let rem = g % (h * w);
        let (y, xx) = (rem / w, rem % w);
        let base = img * h * w * cin;
        for ky in 0..3 {
            let iy = y as isize + ky as isize - 1;
            for kx in 0..3 {
                let ix = xx as isize + kx as isize - 1;
                let dst = &mut row[(ky * 3 + kx) * cin..(ky * 3 + kx + 1) * cin];
                if iy < 0 || iy >= h as isize || ix < 0 || ix >= w as isize {
                    dst.fill(0.0);
                } else {
                    let src = base + (iy as usize * w + ix as usize) * cin;
                    let src = &x[src..src + cin];
                    if cin < 16 {
                        // A few channels (the RGB input): a plain loop beats
                        // a memcpy call per tap.
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = v;
                        }
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            }
        }
    }
}

/// Forward: `x` (N, H, W, Cin) * `w` (3, 3, Cin, Cout) + `bias` (Cout),
/// then ReLU when `relu`. Returns (N, H, W, Cout).
pub fn conv3x3_forward(
    x: ArrayView4<f32>,
    w: ArrayView4<f32>,
    bias: Option<ArrayView1<f32>>,
    relu: bool,
) -> Array4<f32> {
    let (n, h, wd, _cin, cout) = dims(&x, &w);
    let mut out = Array4::<f32>::zeros((n, h, wd, cout));
    {
        let m = n * h * wd;
        let out2 = out
            .view_mut()
            .into_shape_with_order((m, cout))
            .expect("fresh array is contiguous");
        conv3x3_forward_into(x, w, bias, relu, out2);
    }
    out
}

/// [`conv3x3_forward`] into a caller's (N*H*W, Cout) matrix, which is
/// overwritten (never read).
pub fn conv3x3_forward_into(
    x: ArrayView4<f32>,
    w: ArrayView4<f32>,
    bias: Option<ArrayView1<f32>>,
    relu: bool,
    out: ArrayViewMut2<f32>,
) {
    let (n, h, wd, cin, cout) = dims(&x, &w);
    let m = n * h * wd;
    assert_eq!(
        out.dim(),
        (m, cout),
        "conv3x3: output must be ({m}, {cout})"
    );
    if let Some(b) = &bias {
        assert_eq!(
            b.len(),
            cout,
            "conv3x3: bias has {} entries, expected {cout}",
            b.len()
        );
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

    let plan = ConvPlan::new(m, cin, cout);
    let jobs = split_tiles(out, plan.pixels, plan.couts);
    jobs.into_par_iter()
        .for_each_init(Vec::<f32>::new, |col, (p0, c0, mut tile)| {
            let (rows, cols) = tile.dim();
            col.resize(rows * 9 * cin, 0.0);
            im2col(xs, h, wd, cin, p0, rows, col);
            let col_v = ArrayView2::from_shape((rows, 9 * cin), &col[..rows * 9 * cin])
                .expect("sized above");
            // (rows, cols) = (rows, 9*Cin) x (9*Cin, cols)
            sgemm_serial(
                Backend::DEFAULT,
                col_v,
                w2.slice(s![.., c0..c0 + cols]),
                tile.view_mut(),
                false,
            );
            let b = bias
                .as_ref()
                .map(|b| &b.as_slice().expect("owned")[c0..c0 + cols]);
            bias_relu(tile, b, relu);
        });
}

/// Adds `bias` to every row of `tile` and applies ReLU, in one pass.
fn bias_relu(mut tile: ArrayViewMut2<f32>, bias: Option<&[f32]>, relu: bool) {
    for mut row in tile.rows_mut() {
        let row = row.as_slice_mut().expect("tile rows are contiguous");
        match (bias, relu) {
            (Some(b), true) => row
                .iter_mut()
                .zip(b)
                .for_each(|(v, &bb)| *v = (*v + bb).max(0.0)),
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
pub fn conv3x3_backward(
    x: ArrayView4<f32>,
    w: ArrayView4<f32>,
    dz: ArrayView4<f32>,
    need_dx: bool,
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
    let dz2 = dz_std
        .view()
        .into_shape_with_order((m, cout))
        .expect("standard layout");

    // dW (9*Cin, Cout) = sum over pixel chunks of col^T (9*Cin, Pc) x dZ (Pc, Cout).
    let mut dw2 = Array2::<f32>::zeros((k, cout));
    if m > 0 && k > 0 {
        let chunk_rows = (COL_TILE_BYTES / (k * std::mem::size_of::<f32>()))
            .max(1)
            .min(m);
        let mut col = vec![0.0f32; chunk_rows * k];
        const BUILD_ROWS: usize = 64;
        for (ci, p0) in (0..m).step_by(chunk_rows).enumerate() {
            let rows = chunk_rows.min(m - p0);
            col[..rows * k]
                .par_chunks_mut(BUILD_ROWS * k)
                .enumerate()
                .for_each(|(bi, part)| {
                    im2col(xs, h, wd, cin, p0 + bi * BUILD_ROWS, part.len() / k, part)
                });
            let col_v = ArrayView2::from_shape((rows, k), &col[..rows * k]).expect("sized above");
            sgemm(
                col_v.t(),
                dz2.slice(s![p0..p0 + rows, ..]),
                dw2.view_mut(),
                ci > 0,
            );
        }
    }
    let dw = dw2
        .into_shape_with_order((3, 3, cin, cout))
        .expect("contiguous");

    let db = column_sums(dz2);
    let dx = need_dx.then(|| {
        let wt = flip_kernel(w);
        conv3x3_forward(dz_std.view(), wt.view(), None, false)
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
    partials
        .into_iter()
        .fold(Array1::zeros(cols), |acc, p| acc + p)
}

/// FLOPs of a forward pass (2 per multiply-add, padding taps included).
pub fn forward_flops(n: usize, h: usize, w: usize, cin: usize, cout: usize) -> f64 {
    2.0 * (n * h * w) as f64 * (9 * cin) as f64 * cout as f64
}
