//! Direct 3x3 "same" convolution for CPUs with AVX-512: no im2col copy.
//!
//! The im2col path (`conv.rs`) copies every input pixel nine times into a
//! scratch tile and then hands the tile to a general GEMM, which packs the
//! kernel again for every tile. Here the GEMM is written for the
//! convolution instead:
//!
//! - the kernel (9*Cin, Cout) is packed once per call into panels of
//!   [`NR`] = 32 output channels, each panel (9*Cin, 32) contiguous and
//!   64-byte aligned (two zmm loads per reduction step);
//! - the left-hand matrix is never built: for a block of [`MR`] = 12 output
//!   pixels, each of the 9 taps has 12 row pointers straight into the NHWC
//!   input (Cin contiguous floats each), or into a row of zeros where the
//!   tap falls on the padding; a tap whose 12 pointers all hit the padding
//!   is skipped;
//! - the micro-kernel keeps the 12 x 32 output block in 24 zmm registers
//!   through the 9 taps of a [`KC`]-channel chunk, broadcasting one input
//!   value per pixel per step for two FMAs; after the last chunk it adds the
//!   bias, applies ReLU and stores (masked when Cout is not a multiple of
//!   32), so the output is written once and never zero-filled.
//!
//! Loop nest of one job (a run of output pixels x a run of channel panels):
//! ```text
//! LOOP 1: for each channel panel of the job       (9*Cin x 32 floats, L2)
//! LOOP 2:   for each chunk of KC input channels   (9*KC x 32 panel rows)
//! LOOP 3:     for each 12-pixel block of the job  (partial sums: scratch)
//! LOOP 4:       for each tap with a pixel inside  (the kernel, from here)
//! LOOP 5:         for ci in the chunk: 12 broadcasts, 24 FMAs
//! ```
//! A job's input rows are sized to stay in L2 across its panels; a chunk's
//! panel rows stay in L2 across the job's pixel blocks, and a block's input
//! runs for one chunk (12 pixels x 9 taps x KC channels, mostly shared
//! between taps) in L1. Each output value is one fixed-order sum (chunks,
//! then taps in (ky, kx) order, then channels), computed by one job, so the
//! result does not depend on the thread count.

use ndarray::{ArrayView2, ArrayView4};
use rayon::prelude::*;

/// Output pixels per micro-kernel block.
pub const MR: usize = 12;
/// Output channels per micro-kernel block (two zmm vectors).
pub const NR: usize = 32;
/// Below this many input channels a job gathers its pixels' taps into
/// rows first (see [`conv3x3_direct`]): with 3 channels (the RGB layer) a
/// tap is too short a reduction to pay for its 12 row pointers.
pub const MIN_CIN: usize = 16;
/// Target bytes of input rows one job reads (kept in L2 across panels).
const JOB_INPUT_BYTES: usize = 512 << 10;
/// Largest job in pixels (very cheap pixels, e.g. 64 channels).
const MAX_JOB_PIXELS: usize = MR * 192;
/// Smallest job in pixels when the shape is cut for parallelism.
const MIN_JOB_PIXELS: usize = MR * 4;
/// Jobs a layer is cut into at least, when its shape allows.
const TARGET_JOBS: usize = 8;
/// Channel chunk: input channels per micro-kernel call. A call runs the 9
/// taps of the chunk with the sums in registers; its 12 x 3 x 3 input runs
/// of KC channels stay in L1 (about 20 KiB at 128), its 9*KC x 32 panel
/// rows (144 KiB) stream from L2.
pub const KC: usize = 128;

/// True when this CPU runs the direct path (x86-64 with AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernel (9*Cin, Cout) as panels of [`NR`] channels: panel j holds
/// the 9*Cin rows of columns j*NR .. j*NR+NR, zero-padded past Cout, rows
/// ordered by channel chunk ([`KC`] channels), tap, then channel. 64-byte
/// aligned.
pub struct PackedKernel {
    buf: Vec<f32>,
    offset: usize,
    pub k: usize,
    pub cout: usize,
}

impl PackedKernel {
    /// Packs a Keras kernel (3, 3, Cin, Cout), any memory layout.
    pub fn from_keras(w: ArrayView4<f32>) -> PackedKernel {
        let (kh, kw, cin, cout) = w.dim();
        let w = w.as_standard_layout();
        let w2 = w.view().into_shape_with_order((kh * kw * cin, cout));
        PackedKernel::new(w2.expect("standard layout"))
    }

    /// Packs the kernel as the GEMM matrix (9*Cin, Cout).
    pub fn new(w2: ArrayView2<f32>) -> PackedKernel {
        let (k, cout) = w2.dim();
        let panels = cout.div_ceil(NR);
        let len = panels * k * NR;
        let mut buf = vec![0.0f32; len + 16];
        let offset = buf.as_ptr().align_offset(64);
        // The kernel's aligned loads depend on this (a 4-byte-aligned f32
        // pointer always reaches 64 within 16 elements).
        assert!(offset < 16, "cannot align the packed kernel");
        let data = &mut buf[offset..offset + len];
        data.par_chunks_mut(k * NR).enumerate().for_each(|(j, panel)| {
            let c0 = j * NR;
            let cols = NR.min(cout - c0);
            // Panel row order: channel chunk, then tap, then channel in the
            // chunk, so that one kernel call reads one contiguous run.
            let cin = k / 9;
            let order = (0..cin).step_by(KC).flat_map(|c0| {
                let c1 = (c0 + KC).min(cin);
                (0..9).flat_map(move |t| (c0..c1).map(move |ci| t * cin + ci))
            });
            for (row, dst) in order.zip(panel.chunks_exact_mut(NR)) {
                let src = w2.row(row);
                let src = src.slice(ndarray::s![c0..c0 + cols]);
                match src.as_slice() {
                    Some(src) => dst[..cols].copy_from_slice(src),
                    None => dst[..cols].iter_mut().zip(src.iter()).for_each(|(d, &v)| *d = v),
                }
            }
        });
        PackedKernel { buf, offset, k, cout }
    }

    fn panel(&self, j: usize) -> &[f32] {
        let start = self.offset + j * self.k * NR;
        &self.buf[start..start + self.k * NR]
    }

    fn panels(&self) -> usize {
        self.cout.div_ceil(NR)
    }
}

/// How one layer is cut into jobs: `pixels` output pixels (a multiple of
/// [`MR`]) by `panels` channel panels. Depends only on the shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectPlan {
    pub pixels: usize,
    pub panels: usize,
}

impl DirectPlan {
    pub fn new(m: usize, w: usize, cin: usize, cout: usize) -> DirectPlan {
        let row_bytes = cin.max(1) * std::mem::size_of::<f32>();
        // A job of P pixels reads about P + 2*W + 2 input pixels.
        let fit = (JOB_INPUT_BYTES / row_bytes).saturating_sub(2 * w + 2);
        let mut pixels = (fit / MR * MR).clamp(MIN_JOB_PIXELS, MAX_JOB_PIXELS);
        let want = TARGET_JOBS.min(m.div_ceil(MIN_JOB_PIXELS)).max(1);
        if m.div_ceil(pixels) < want {
            pixels = m.div_ceil(want).div_ceil(MR) * MR;
        }
        pixels = pixels.max(MR);
        let jobs = m.div_ceil(pixels);
        let total = cout.div_ceil(NR).max(1);
        let mut parts = 1;
        if jobs < TARGET_JOBS {
            parts = TARGET_JOBS.div_ceil(jobs).min(total);
        }
        DirectPlan {
            pixels,
            panels: total.div_ceil(parts),
        }
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: jobs write disjoint (pixel, channel) blocks of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out` (N*H*W, Cout) = conv3x3(x, kernel) + bias, then ReLU when `relu`.
/// `x` is NHWC (n, h, w, cin) as a flat slice; every element of `out` is
/// written once and none is read, so it may start uninitialised. Panics
/// unless [`available`] (callers check).
pub fn conv3x3_direct(
    x: &[f32],
    (n, h, w, cin): (usize, usize, usize, usize),
    kernel: &PackedKernel,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(available(), "conv3x3_direct needs AVX-512F");
    let cout = kernel.cout;
    let m = n * h * w;
    assert_eq!(x.len(), m * cin, "conv3x3_direct: input is not (n, h, w, cin)");
    assert_eq!(
        kernel.k,
        9 * cin,
        "conv3x3_direct: kernel has {} rows, expected {}",
        kernel.k,
        9 * cin
    );
    assert_eq!(out.len(), m * cout, "conv3x3_direct: output is not (n*h*w, cout)");
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            cout,
            "conv3x3_direct: bias has {} entries, expected {cout}",
            b.len()
        );
    }
    if m == 0 || cout == 0 {
        return;
    }
    // Bias padded to whole panels (zeros when there is none).
    let mut bias_pad = vec![0.0f32; kernel.panels() * NR];
    if let Some(b) = bias {
        bias_pad[..cout].copy_from_slice(b);
    }
    let zeros = vec![0.0f32; cin];
    let plan = DirectPlan::new(m, w, cin, cout);
    let pixel_jobs = m.div_ceil(plan.pixels);
    let panel_jobs = kernel.panels().div_ceil(plan.panels);
    let out_ptr = OutPtr(out.as_mut_ptr().cast::<f32>());
    // Few input channels (the RGB layer): a job first gathers its pixels'
    // 9*cin taps into rows (im2col, 27 floats a pixel at cin = 3), and the
    // kernel runs each row as a single tap of 9*cin channels; 9*cin fits one
    // chunk, so the panel rows are in the plain order that this reads.
    let gathered = cin < MIN_CIN;
    let taps = if gathered { 1 } else { 9 };
    (0..pixel_jobs * panel_jobs).into_par_iter().for_each_init(
        || (Vec::<*const f32>::new(), Vec::<f32>::new(), Vec::<f32>::new()),
        |(ptrs, acc, col), job| {
            let (pj, cj) = (job / panel_jobs, job % panel_jobs);
            let p0 = pj * plan.pixels;
            let p1 = (p0 + plan.pixels).min(m);
            let blocks = (p1 - p0).div_ceil(MR);
            // Row pointers (taps x MR a block) and live-tap masks.
            ptrs.clear();
            ptrs.resize(blocks * taps * MR, zeros.as_ptr());
            let mut masks = vec![0u16; blocks];
            if gathered {
                let k = 9 * cin;
                col.resize(blocks * MR * k, 0.0);
                super::conv::im2col(x, h, w, cin, p0, p1 - p0, col);
                col[(p1 - p0) * k..].fill(0.0);
                for (i, p) in ptrs.iter_mut().enumerate() {
                    *p = col[i * k..].as_ptr();
                }
                masks.fill(1);
            }
            // Output pixel (img, y, xx) of p0, then stepped along.
            let (mut img, mut y, mut xx) = (p0 / (h * w), (p0 % (h * w)) / w, p0 % w);
            for i in 0..if gathered { 0 } else { p1 - p0 } {
                let (blk, r) = (i / MR, i % MR);
                let table = &mut ptrs[blk * 9 * MR..(blk + 1) * 9 * MR];
                for t in 0..9 {
                    // Input pixel (y + dy - 1, xx + dx - 1), if inside.
                    let (iy, ix) = (y + t / 3, xx + t % 3);
                    if iy >= 1 && iy <= h && ix >= 1 && ix <= w {
                        let idx = ((img * h + iy - 1) * w + ix - 1) * cin;
                        table[t * MR + r] = x[idx..idx + cin].as_ptr();
                        masks[blk] |= 1 << t;
                    }
                }
                xx += 1;
                if xx == w {
                    xx = 0;
                    y += 1;
                    if y == h {
                        y = 0;
                        img += 1;
                    }
                }
            }
            let j0 = cj * plan.panels;
            let j1 = (j0 + plan.panels).min(kernel.panels());
            // Scratch reused across jobs: every block's first chunk
            // overwrites its sums, so stale values are never read.
            if acc.len() < blocks * MR * NR + 16 {
                acc.resize(blocks * MR * NR + 16, 0.0);
            }
            let a0 = acc.as_ptr().align_offset(64);
            assert!(a0 < 16, "cannot align the partial sums");
            let accs = &mut acc[a0..a0 + blocks * MR * NR];
            for j in j0..j1 {
                let panel = kernel.panel(j);
                let tail = Tail {
                    bias: bias_pad[j * NR..].as_ptr(),
                    relu,
                    ldo: cout,
                    cols: NR.min(cout - j * NR),
                };
                // LOOP 2: channel chunks (9*kc panel rows, contiguous).
                let mut c0 = 0;
                while c0 < cin {
                    let kc = if gathered { 9 * cin } else { KC.min(cin - c0) };
                    let bchunk = panel[9 * c0 * NR..].as_ptr();
                    let (first, last) = (c0 == 0, c0 + kc >= cin);
                    // LOOP 3: the job's pixel blocks; LOOP 4 (taps) and 5
                    // (channels) run in the kernel.
                    for (blk, &mask) in masks.iter().enumerate() {
                        let g0 = p0 + blk * MR;
                        // SAFETY: AVX-512F checked above; each pointer
                        // addresses `cin` floats (an input row or `zeros`),
                        // so c0..c0+kc is in bounds; the chunk holds
                        // 9*kc*NR floats of the panel; the block's partial
                        // sums are MR*NR floats, 64-byte aligned; the last
                        // chunk writes rows g0..g0+rows, columns
                        // j*NR..j*NR+cols of `out`, which only this job
                        // writes.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            kernel_12x32(
                                ptrs[blk * taps * MR..].as_ptr(),
                                taps,
                                mask,
                                c0,
                                kc,
                                bchunk,
                                accs[blk * MR * NR..].as_mut_ptr(),
                                first,
                                last.then(|| (out_ptr.get().add(g0 * cout + j * NR), MR.min(p1 - g0))),
                                &tail,
                            );
                        }
                    }
                    c0 += kc;
                }
            }
        },
    );
}

/// How the last reduction chunk of a block leaves the kernel: plus the bias
/// (padded to [`NR`]), ReLU or not, into `out` rows of stride `ldo`, the
/// first `cols` columns.
struct Tail {
    bias: *const f32,
    relu: bool,
    ldo: usize,
    cols: usize,
}

/// The micro-kernel: adds one channel chunk to an [`MR`] x [`NR`] block.
///
/// `ptrs` holds the block's `taps` x MR row pointers (tap-major; 9 taps, or
/// 1 for gathered rows); taps whose bit is clear in `mask` are skipped. The chunk covers channels c0..c0+kc of
/// every tap; `b` is the panel's matching 9 x kc x NR rows (tap-major).
/// `acc` holds the block's MR x NR partial sums (64-byte aligned): read
/// unless `first`, written back unless `out` is given; then (the last chunk)
/// bias and ReLU are applied and `rows` rows go to `out` instead.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_12x32(
    ptrs: *const *const f32,
    taps: usize,
    mask: u16,
    c0: usize,
    kc: usize,
    b: *const f32,
    acc: *mut f32,
    first: bool,
    out: Option<(*mut f32, usize)>,
    tail: &Tail,
) {
    use std::arch::x86_64::*;
    let mut s0 = [_mm512_setzero_ps(); MR];
    let mut s1 = [_mm512_setzero_ps(); MR];
    if !first {
        for r in 0..MR {
            s0[r] = _mm512_load_ps(acc.add(r * NR));
            s1[r] = _mm512_load_ps(acc.add(r * NR + 16));
        }
    }
    for t in 0..taps {
        if mask & (1 << t) == 0 {
            continue;
        }
        let a: [*const f32; MR] = std::array::from_fn(|r| (*ptrs.add(t * MR + r)).add(c0));
        let mut bp = b.add(t * kc * NR);
        for ci in 0..kc {
            let b0 = _mm512_load_ps(bp);
            let b1 = _mm512_load_ps(bp.add(16));
            for r in 0..MR {
                let av = _mm512_set1_ps(*a[r].add(ci));
                s0[r] = _mm512_fmadd_ps(av, b0, s0[r]);
                s1[r] = _mm512_fmadd_ps(av, b1, s1[r]);
            }
            bp = bp.add(NR);
        }
    }
    let Some((out, rows)) = out else {
        for r in 0..MR {
            _mm512_store_ps(acc.add(r * NR), s0[r]);
            _mm512_store_ps(acc.add(r * NR + 16), s1[r]);
        }
        return;
    };
    let bias0 = _mm512_loadu_ps(tail.bias);
    let bias1 = _mm512_loadu_ps(tail.bias.add(16));
    let zero = _mm512_setzero_ps();
    let cols = tail.cols;
    let m0: __mmask16 = if cols >= 16 {
        0xffff
    } else {
        ((1u32 << cols) - 1) as u16
    };
    let m1: __mmask16 = if cols >= 32 {
        0xffff
    } else {
        ((1u32 << cols.saturating_sub(16)) - 1) as u16
    };
    for r in 0..rows.min(MR) {
        let mut v0 = _mm512_add_ps(s0[r], bias0);
        let mut v1 = _mm512_add_ps(s1[r], bias1);
        if tail.relu {
            // max(v, 0) returns 0 for NaN, as f32::max does.
            v0 = _mm512_max_ps(v0, zero);
            v1 = _mm512_max_ps(v1, zero);
        }
        let o = out.add(r * tail.ldo);
        _mm512_mask_storeu_ps(o, m0, v0);
        _mm512_mask_storeu_ps(o.add(16), m1, v1);
    }
}
