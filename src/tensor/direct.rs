//! Direct 3x3 "same" convolution: no im2col copy, one micro-kernel per
//! instruction set ([`Isa`]): AVX-512F, AVX2 + FMA, and portable Rust.
//!
//! The im2col path (`conv.rs`) copies every input pixel nine times into a
//! scratch tile and then hands the tile to a general GEMM, which packs the
//! kernel again for every tile. Here the GEMM is written for the
//! convolution instead:
//!
//! - the kernel (9*Cin, Cout) is packed once into panels of `nr` output
//!   channels, each panel (9*Cin, nr) contiguous and 64-byte aligned (whole
//!   vector loads per reduction step);
//! - the left-hand matrix is never built: for a block of `mr` output
//!   pixels, each of the 9 taps has `mr` row pointers straight into the NHWC
//!   input (Cin contiguous floats each), or into a row of zeros where the
//!   tap falls on the padding; a tap whose pointers all hit the padding is
//!   skipped;
//! - the micro-kernel keeps the `mr` x `nr` output block in registers
//!   through the 9 taps of a `kc`-channel chunk, broadcasting one input
//!   value per pixel per step for `nr / lanes` FMAs; after the last chunk it
//!   adds the bias, applies ReLU and stores (masked when Cout is not a
//!   multiple of `nr`), so the output is written once and never zero-filled.
//!
//! Register blocking ([`Geometry`]): AVX-512 has 32 zmm registers, so 12
//! pixels x 32 channels = 24 sums + 2 kernel vectors + 1 broadcast (14
//! pixels, one image row, on rows of 14: [`Geometry::direct`]);
//! AVX2 has
//! 16 ymm registers, so 6 x 16 = 12 sums + 2 kernel vectors + 1 broadcast
//! (per step: 2 kernel loads and 6 broadcasts for 12 FMAs, so the two FMA
//! pipes, not the loads, set the pace). The portable kernel uses the AVX2
//! geometry in plain arrays.
//!
//! Loop nest of one job (a run of output pixels x a run of channel panels):
//! ```text
//! LOOP 1: for each channel panel of the job       (9*Cin x nr floats, L2)
//! LOOP 2:   for each chunk of kc input channels   (9*kc x nr panel rows)
//! LOOP 3:     for each mr-pixel block of the job  (partial sums: scratch)
//! LOOP 4:       for each tap with a pixel inside  (the kernel, from here)
//! LOOP 5:         for ci in the chunk: mr broadcasts, mr*nr/lanes FMAs
//! ```
//! A job's input rows are sized to stay in L2 across its panels; a chunk's
//! panel rows stay in L2 across the job's pixel blocks, and a block's input
//! runs for one chunk (mostly shared between taps) in L1. Each output value
//! is one fixed-order sum (chunks, then taps in (ky, kx) order, then
//! channels), computed by one job, so the result does not depend on the
//! thread count.

use super::dispatch::Isa;
use ndarray::{ArrayView2, ArrayView4};
use rayon::prelude::*;

/// Register blocking and reduction chunk of one ISA's micro-kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Output pixels per micro-kernel block.
    pub mr: usize,
    /// Output channels per block (a whole number of vectors).
    pub nr: usize,
    /// Input channels per micro-kernel call (the 9 taps of a chunk run
    /// with the sums in registers).
    pub kc: usize,
}

impl Geometry {
    pub const fn of(isa: Isa) -> Geometry {
        match isa {
            Isa::Avx512 => Geometry {
                mr: 12,
                nr: 32,
                kc: 128,
            },
            Isa::Avx2 => Geometry { mr: 6, nr: 16, kc: 128 },
            Isa::Generic => Geometry { mr: 6, nr: 16, kc: 128 },
        }
    }

    /// The direct convolution's geometry for images `w` pixels wide: as
    /// [`Geometry::of`], except that on AVX-512 rows of 14 pixels (block5
    /// at 224 px) take blocks of 14 pixels (28 zmm sums, 2 kernel vectors
    /// and 1 broadcast: 31 of the 32 registers). Such a block is one image
    /// row, so the top and bottom rows skip their three dead taps outright
    /// (a block of 12 straddled rows and multiplied 4-5% of its taps by the
    /// padding), and each kernel vector load feeds 14 FMAs instead of 12:
    /// 3-6% faster at 14 x 14 x 512. On wider rows (blocks of 14 along a
    /// row) the dead taps are a smaller fraction and the two row pointers
    /// the 14-pixel loop reloads from the stack cost as much: level to 4%
    /// slower at 28, 56 and 224, so they keep 12.
    pub const fn direct(isa: Isa, w: usize) -> Geometry {
        let g = Geometry::of(isa);
        match isa {
            Isa::Avx512 if w == 14 => Geometry { mr: 14, ..g },
            _ => g,
        }
    }
}

/// Largest `mr` of any geometry (sizes the per-block pointer table).
pub const MAX_MR: usize = 14;
/// Below this many input channels a tap is a kernel row's three input
/// pixels (3*Cin contiguous floats) instead of one pixel (see
/// [`conv3x3_direct`]): with 3 channels (the RGB layer) a one-pixel tap is
/// too short a reduction to pay for its row pointer.
pub const MIN_CIN: usize = 16;
/// Output size from which the RGB layer streams its stores (see
/// [`conv3x3_direct`]): four times a 32 MB L3.
const STREAM_BYTES: usize = 128 << 20;
/// Target bytes of input rows one job reads (kept in L2 across panels).
const JOB_INPUT_BYTES: usize = 512 << 10;
/// Largest job in 12-pixel units (very cheap pixels, e.g. 64 channels).
const MAX_JOB_PIXELS: usize = 12 * 192;
/// Smallest job in pixels when the shape is cut for parallelism.
const MIN_JOB_PIXELS: usize = 48;
/// Jobs a layer is cut into at least, when its shape allows.
const TARGET_JOBS: usize = 8;

/// The kernel (9*Cin, Cout) as panels of `nr` channels for one ISA: panel j
/// holds the 9*Cin rows of columns j*nr .. j*nr+nr, zero-padded past Cout,
/// rows ordered by channel chunk (`kc` channels), tap, then channel.
/// 64-byte aligned.
pub struct PackedKernel {
    buf: Vec<f32>,
    offset: usize,
    pub isa: Isa,
    /// Rows of the matrix (taps * Cin).
    pub k: usize,
    pub cout: usize,
    /// 9 for a 3x3 conv kernel, 1 for a plain GEMM right-hand matrix.
    pub taps: usize,
}

impl PackedKernel {
    /// Packs a Keras kernel (3, 3, Cin, Cout), any memory layout, for `isa`.
    pub fn from_keras(isa: Isa, w: ArrayView4<f32>) -> PackedKernel {
        let (kh, kw, cin, cout) = w.dim();
        let w = w.as_standard_layout();
        let w2 = w.view().into_shape_with_order((kh * kw * cin, cout));
        PackedKernel::new(isa, w2.expect("standard layout"))
    }

    /// Packs the kernel as the GEMM matrix (9*Cin, Cout) for `isa`.
    pub fn new(isa: Isa, w2: ArrayView2<f32>) -> PackedKernel {
        PackedKernel::with_taps(isa, w2, 9)
    }

    /// Packs a plain GEMM right-hand matrix (K, N) for [`gemm_packed`].
    pub fn gemm(isa: Isa, b: ArrayView2<f32>) -> PackedKernel {
        PackedKernel::with_taps(isa, b, 1)
    }

    /// An all-zero GEMM right-hand matrix (K, N) in [`PackedKernel::gemm`]'s
    /// layout, to be filled through [`PackedKernel::panels_mut`]: panel j
    /// holds, row after row, the `nr` columns j*nr.. of each of the K rows.
    pub fn gemm_zeroed(isa: Isa, k: usize, cout: usize) -> PackedKernel {
        let nr = Geometry::of(isa).nr;
        let len = cout.div_ceil(nr) * k * nr;
        let buf = vec![0.0f32; len + 16];
        let offset = buf.as_ptr().align_offset(64);
        // The kernels' aligned loads depend on this (a 4-byte-aligned f32
        // pointer always reaches 64 within 16 elements).
        assert!(offset < 16, "cannot align the packed kernel");
        PackedKernel {
            buf,
            offset,
            isa,
            k,
            cout,
            taps: 1,
        }
    }

    /// The panels of a one-tap matrix ([`PackedKernel::gemm_zeroed`]), to
    /// fill: each K rows of `nr` floats.
    pub fn panels_mut(&mut self) -> std::slice::ChunksExactMut<'_, f32> {
        assert_eq!(self.taps, 1, "panels_mut: a one-tap (GEMM) matrix only");
        let nr = Geometry::of(self.isa).nr;
        let len = self.panels() * self.k * nr;
        self.buf[self.offset..self.offset + len].chunks_exact_mut((self.k * nr).max(1))
    }

    /// Packs the kernel of the transposed convolution (dX of a layer whose
    /// kernel is `w`, Keras (3, 3, Cin, Cout)): the same panels as
    /// [`PackedKernel::from_keras`] of [`super::conv::flip_kernel`]`(w)`,
    /// (3, 3, Cout, Cin), read straight from `w` without the flipped copy.
    pub fn from_keras_flipped(isa: Isa, w: ArrayView4<f32>) -> PackedKernel {
        let (kh, kw, cin, cout) = w.dim();
        assert_eq!((kh, kw), (3, 3), "PackedKernel: kernel must be 3x3, is {kh}x{kw}");
        let mut packed = PackedKernel::gemm_zeroed(isa, 9 * cout, cin);
        packed.taps = 9;
        packed.refill_flipped(w);
        packed
    }

    /// Packs `w` (3, 3, Cin, Cout) again into this kernel, which was packed
    /// by [`PackedKernel::from_keras`] from a kernel of the same shape:
    /// the buffer is reused (stage 2 repacks block5 after every step; a
    /// fresh 9 MB buffer is fresh pages the OS zeroes first).
    pub fn refill(&mut self, w: ArrayView4<f32>) {
        let (kh, kw, cin, cout) = w.dim();
        assert!(
            self.taps == kh * kw && self.k == kh * kw * cin && self.cout == cout,
            "PackedKernel::refill: kernel is {kh}x{kw}x{cin}x{cout}, packed for {}x{}",
            self.k,
            self.cout
        );
        let w = w.as_standard_layout();
        self.fill_rows(w.as_slice().expect("standard layout"));
    }

    /// [`PackedKernel::refill`] for a kernel packed by
    /// [`PackedKernel::from_keras_flipped`]: `w` is the layer's own kernel
    /// (3, 3, Cin, Cout), packed flipped.
    pub fn refill_flipped(&mut self, w: ArrayView4<f32>) {
        let (kh, kw, cin, cout) = w.dim();
        assert!(
            (kh, kw) == (3, 3) && self.taps == 9 && self.k == 9 * cout && self.cout == cin,
            "PackedKernel::refill_flipped: kernel is {kh}x{kw}x{cin}x{cout}, packed for {}x{}",
            self.k,
            self.cout
        );
        let w = w.as_standard_layout();
        let ws = w.as_slice().expect("standard layout");
        // Row (tap, co) of the flipped kernel, columns ci: W[8 - tap][ci][co].
        self.fill(|row, c0, dst| {
            let (tap, co) = (row / cout, row % cout);
            let src = &ws[(8 - tap) * cin * cout + co..];
            for (c, d) in dst.iter_mut().enumerate() {
                *d = src[(c0 + c) * cout];
            }
        });
    }

    fn with_taps(isa: Isa, w2: ArrayView2<f32>, taps: usize) -> PackedKernel {
        let (k, cout) = w2.dim();
        assert!(
            k.is_multiple_of(taps),
            "PackedKernel: {k} rows is not {taps} taps of equal length"
        );
        let mut packed = PackedKernel::gemm_zeroed(isa, k, cout);
        packed.taps = taps;
        let w2 = w2.as_standard_layout();
        packed.fill_rows(w2.as_slice().expect("standard layout"));
        packed
    }

    /// Fills the panels from the row-major (k, cout) matrix `ws`.
    fn fill_rows(&mut self, ws: &[f32]) {
        let cout = self.cout;
        self.fill(|row, c0, dst| {
            let src = &ws[row * cout + c0..];
            match dst.len() {
                // Whole panels (all but a last narrow one) as fixed-size
                // copies: a call of memmove per 16 floats was a tenth of
                // a small training step.
                16 => dst.copy_from_slice(&src[..16]),
                32 => dst.copy_from_slice(&src[..32]),
                cols => dst.copy_from_slice(&src[..cols]),
            }
        });
    }

    /// Fills the panels of this (k, cout) matrix of `taps` equal runs of
    /// rows; `row(r, c0, dst)` fills `dst` with columns c0..c0+dst.len() of
    /// row r. Padding columns past `cout` are left as they are (zero since
    /// [`PackedKernel::gemm_zeroed`]).
    fn fill(&mut self, row: impl Fn(usize, usize, &mut [f32]) + Sync) {
        let Geometry { nr, kc, .. } = Geometry::of(self.isa);
        let (k, cout, taps) = (self.k, self.cout, self.taps);
        let len = self.panels() * k * nr;
        let offset = self.offset;
        let data = &mut self.buf[offset..offset + len];
        let cin = k / taps;
        data.par_chunks_mut((k * nr).max(1)).enumerate().for_each(|(j, panel)| {
            let c0 = j * nr;
            let cols = nr.min(cout - c0);
            // Panel row order: channel chunk, then tap, then channel in the
            // chunk, so that one kernel call reads one contiguous run.
            let mut dst = panel.chunks_exact_mut(nr);
            for q0 in (0..cin).step_by(kc) {
                for t in 0..taps {
                    for ci in q0..(q0 + kc).min(cin) {
                        let d = dst.next().expect("k rows a panel");
                        row(t * cin + ci, c0, &mut d[..cols]);
                    }
                }
            }
        });
    }

    /// The packed panels, back to back, for writers that fill them in
    /// place in parallel (each job its own rows; see `winograd.rs`).
    pub(crate) fn data_ptr_mut(&mut self) -> *mut f32 {
        let offset = self.offset;
        self.buf[offset..].as_mut_ptr()
    }

    /// Panels of `nr` columns.
    pub fn panels(&self) -> usize {
        self.cout.div_ceil(Geometry::of(self.isa).nr)
    }

    fn panel(&self, j: usize) -> &[f32] {
        let nr = Geometry::of(self.isa).nr;
        let start = self.offset + j * self.k * nr;
        &self.buf[start..start + self.k * nr]
    }
}

/// How one layer is cut into jobs: `pixels` output pixels (a multiple of
/// the geometry's `mr`) by `panels` channel panels. Depends only on the
/// shape and the ISA, never on the thread count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectPlan {
    pub pixels: usize,
    pub panels: usize,
}

impl DirectPlan {
    pub fn new(isa: Isa, m: usize, w: usize, cin: usize, cout: usize) -> DirectPlan {
        let Geometry { mr, nr, .. } = Geometry::direct(isa, w);
        let row_bytes = cin.max(1) * std::mem::size_of::<f32>();
        // A job of P pixels reads about P + 2*W + 2 input pixels.
        let fit = (JOB_INPUT_BYTES / row_bytes).saturating_sub(2 * w + 2);
        let mut pixels = fit.clamp(MIN_JOB_PIXELS, MAX_JOB_PIXELS) / mr * mr;
        let want = TARGET_JOBS.min(m.div_ceil(MIN_JOB_PIXELS)).max(1);
        if m.div_ceil(pixels) < want {
            pixels = m.div_ceil(want).div_ceil(mr) * mr;
        }
        pixels = pixels.max(mr);
        let jobs = m.div_ceil(pixels);
        let total = cout.div_ceil(nr).max(1);
        let mut parts = 1;
        if jobs < TARGET_JOBS {
            parts = TARGET_JOBS.div_ceil(jobs).min(total);
        }
        DirectPlan {
            pixels,
            panels: total.div_ceil(parts),
        }
    }

    /// As [`DirectPlan::new`] for [`conv3x3_direct_pool2`]: `pixels` a
    /// multiple of two image rows (2*w; of the blocks' `mr` too where both
    /// fit in a job), so that every job pools whole row pairs.
    pub fn pooled(isa: Isa, m: usize, w: usize, cin: usize, cout: usize) -> DirectPlan {
        let plan = DirectPlan::new(isa, m, w, cin, cout);
        let pair = 2 * w.max(1);
        let mr = Geometry::direct(isa, w).mr;
        let both = pair / gcd(pair, mr) * mr;
        let unit = if both <= plan.pixels { both } else { pair };
        DirectPlan {
            pixels: (plan.pixels / unit).max(1) * unit,
            ..plan
        }
    }
}

const fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Whether [`conv3x3_direct`] writes `out` with streaming stores. The
/// RGB layer (under [`MIN_CIN`] input channels) does 9*Cin multiply-adds
/// per output (27), so at 224 px it writes its output (205 MB at batch 16)
/// as fast as memory takes it, and a plain store first reads every line it
/// fills. Its rows go out as streaming stores instead when the output is
/// far past any cache (its reader finds it in memory either way) and the
/// rows start on 64 bytes (`out` aligned, Cout a multiple of 16), on
/// AVX-512 and AVX2. RGB layer at 224 px, batch 16, AVX-512: 18.1-19.2 ->
/// 14.3-16.9 ms.
pub fn streams_output<T>(isa: Isa, cin: usize, cout: usize, out: &[T]) -> bool {
    cin < MIN_CIN
        && isa != Isa::Generic
        && std::mem::size_of_val(out) >= STREAM_BYTES
        && cout.is_multiple_of(16)
        && (out.as_ptr() as usize).is_multiple_of(64)
}

/// The 2x2 max-pool of one panel's output for a job: `full` holds rows of
/// `ld` floats for pixels p0.. (whole row pairs of `w`-pixel images, p0
/// on an even row), the first `cols` valid; output pixel `(p0 + ...) / 4`
/// goes to `out` (rows of `cout` floats, already at the panel's first
/// column). Max in `maxpool2x2`'s order.
///
/// # Safety
/// `out` addresses the pooled pixels' `cols` columns, written by no one
/// else meanwhile.
unsafe fn pool_panel(full: &[f32], ld: usize, cols: usize, w: usize, p0: usize, cout: usize, out: *mut f32) {
    let wo = w / 2;
    for (q, pair) in full.chunks_exact(2 * w * ld).enumerate() {
        let (top, bottom) = pair.split_at(w * ld);
        let orow = (p0 / (2 * w) + q) * wo;
        for ox in 0..wo {
            let (a, b) = (&top[2 * ox * ld..][..cols], &top[(2 * ox + 1) * ld..][..cols]);
            let (d0, d1) = (&bottom[2 * ox * ld..][..cols], &bottom[(2 * ox + 1) * ld..][..cols]);
            let o = std::slice::from_raw_parts_mut(out.add((orow + ox) * cout), cols);
            for i in 0..cols {
                let mut v = a[i];
                for u in [b[i], d0[i], d1[i]] {
                    v = if u > v { u } else { v };
                }
                o[i] = v;
            }
        }
    }
}

/// A pointer that parallel jobs share to write disjoint parts of one
/// buffer (output blocks here, tiles in `winograd.rs`).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: every user writes through it only to parts no other job touches.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out` (N*H*W, Cout) = conv3x3(x, kernel) + bias, then ReLU when `relu`,
/// on the kernel's ISA. `x` is NHWC (n, h, w, cin) as a flat slice; every
/// element of `out` is written once and none is read, so it may start
/// uninitialised. Panics when this CPU cannot run the kernel's ISA (the
/// dispatch never asks for one it cannot).
pub fn conv3x3_direct(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    kernel: &PackedKernel,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    direct(x, dims, kernel, bias, relu, false, out);
}

/// [`conv3x3_direct`] followed by a 2x2 max-pool (stride 2), fused: `out`
/// is (N, H/2, W/2, Cout), H and W even, bit for bit what
/// `maxpool2x2` of the unpooled output gives. Each job covers whole pairs
/// of image rows; it writes its full-resolution block into a scratch of
/// its own (a few hundred KB, in L2) and only the pooled quarter reaches
/// `out`, so the full output (205 MB at 224 px, batch 16) is never
/// written to memory nor read back by a separate pooling pass.
pub fn conv3x3_direct_pool2(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    kernel: &PackedKernel,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    direct(x, dims, kernel, bias, relu, true, out);
}

fn direct(
    x: &[f32],
    (n, h, w, cin): (usize, usize, usize, usize),
    kernel: &PackedKernel,
    bias: Option<&[f32]>,
    relu: bool,
    pool: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let isa = kernel.isa;
    assert!(
        isa.supported(),
        "conv3x3_direct: this CPU cannot run the {} kernel",
        isa.name()
    );
    let Geometry { mr, nr, kc: kc_max } = Geometry::direct(isa, w);
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
    if pool {
        assert!(
            h.is_multiple_of(2) && w.is_multiple_of(2),
            "conv3x3_direct_pool2: {h}x{w} is not an even size"
        );
        assert_eq!(
            out.len(),
            m / 4 * cout,
            "conv3x3_direct_pool2: output is not (n, h/2, w/2, cout)"
        );
    } else {
        assert_eq!(out.len(), m * cout, "conv3x3_direct: output is not (n*h*w, cout)");
    }
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
    let mut bias_pad = vec![0.0f32; kernel.panels() * nr];
    if let Some(b) = bias {
        bias_pad[..cout].copy_from_slice(b);
    }
    // Long enough for a tap of either kind below (cin or 3*cin floats).
    let zeros = vec![0.0f32; 3 * cin];
    let plan = match pool {
        true => DirectPlan::pooled(isa, m, w, cin, cout),
        false => DirectPlan::new(isa, m, w, cin, cout),
    };
    let pixel_jobs = m.div_ceil(plan.pixels);
    let panel_jobs = kernel.panels().div_ceil(plan.panels);
    let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
    // Few input channels (the RGB layer): a 3-channel tap is too short a
    // reduction, so each kernel row ky is one tap of 3*cin floats, the
    // input pixels xx-1..xx+1 of row y+ky-1, contiguous in NHWC (9 floats
    // at cin = 3). Their kernel rows (ky, kx, c) are the panel's plain order
    // (9*cin fits one chunk). Only pixels on the left or right edge copy
    // their three taps, with the zeros of the padding, into `col`.
    let row_taps = cin < MIN_CIN;
    debug_assert!(!row_taps || cin <= kc_max);
    let stream = !pool && streams_output(isa, cin, cout, out);
    let (taps, tap_len) = if row_taps { (3, 3 * cin) } else { (9, cin) };
    // Tap t of an inside pixel, in floats from its top-left tap.
    let tap_offsets: [usize; 9] = std::array::from_fn(|t| ((t / 3) * w + t % 3) * cin);
    (0..pixel_jobs * panel_jobs).into_par_iter().for_each_init(
        || {
            (
                Vec::<*const f32>::new(),
                Vec::<f32>::new(),
                Vec::<f32>::new(),
                Vec::<f32>::new(),
            )
        },
        |(ptrs, acc, col, full), job| {
            let (pj, cj) = (job / panel_jobs, job % panel_jobs);
            let p0 = pj * plan.pixels;
            let p1 = (p0 + plan.pixels).min(m);
            let blocks = (p1 - p0).div_ceil(mr);
            // Row pointers (taps x mr a block) and live-tap masks.
            ptrs.clear();
            ptrs.resize(blocks * taps * mr, zeros.as_ptr());
            let mut masks = vec![0u16; blocks];
            if row_taps {
                // Room for every pixel's edge copy (only edges use it; no
                // pointer into it is taken before it stops growing).
                col.resize((p1 - p0) * 3 * tap_len, 0.0);
            }
            // Output pixel (img, y, xx) of p0, then stepped along.
            let (mut img, mut y, mut xx) = (p0 / (h * w), (p0 % (h * w)) / w, p0 % w);
            for i in 0..p1 - p0 {
                let (blk, r) = (i / mr, i % mr);
                let table = &mut ptrs[blk * taps * mr..(blk + 1) * taps * mr];
                if row_taps {
                    for ky in 0..3 {
                        // Input row y + ky - 1, if inside.
                        if y + ky < 1 || y + ky > h {
                            continue;
                        }
                        let row = (img * h + y + ky - 1) * w;
                        if xx >= 1 && xx + 1 < w {
                            let idx = (row + xx - 1) * cin;
                            table[ky * mr + r] = x[idx..idx + tap_len].as_ptr();
                        } else {
                            let seg = &mut col[(i * 3 + ky) * tap_len..(i * 3 + ky + 1) * tap_len];
                            for (kx, dst) in seg.chunks_exact_mut(cin).enumerate() {
                                // Input column xx + kx - 1, if inside.
                                if xx + kx >= 1 && xx + kx <= w {
                                    let idx = (row + xx + kx - 1) * cin;
                                    dst.copy_from_slice(&x[idx..idx + cin]);
                                } else {
                                    dst.fill(0.0);
                                }
                            }
                            table[ky * mr + r] = seg.as_ptr();
                        }
                        masks[blk] |= 1 << ky;
                    }
                } else if y >= 1 && y + 1 < h && xx >= 1 && xx + 1 < w {
                    // Inside the padding ring (most pixels): all nine taps,
                    // at fixed offsets from the top-left one.
                    let top_left = &x[((img * h + y - 1) * w + xx - 1) * cin..][..(2 * w + 3) * cin];
                    for (t, off) in tap_offsets.iter().enumerate() {
                        table[t * mr + r] = top_left[*off..].as_ptr();
                    }
                    masks[blk] |= 0x1ff;
                } else {
                    for t in 0..9 {
                        // Input pixel (y + dy - 1, xx + dx - 1), if inside.
                        let (iy, ix) = (y + t / 3, xx + t % 3);
                        if iy >= 1 && iy <= h && ix >= 1 && ix <= w {
                            let idx = ((img * h + iy - 1) * w + ix - 1) * cin;
                            table[t * mr + r] = x[idx..idx + cin].as_ptr();
                            masks[blk] |= 1 << t;
                        }
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
            // Pooled: one panel's unpooled output for the job's pixels
            // (pooled as soon as the panel is done, while it is in L1).
            if pool && full.len() < (p1 - p0) * nr {
                full.resize((p1 - p0) * nr, 0.0);
            }
            // Scratch reused across jobs: every block's first chunk
            // overwrites its sums, so stale values are never read.
            if acc.len() < blocks * mr * nr + 16 {
                acc.resize(blocks * mr * nr + 16, 0.0);
            }
            let a0 = acc.as_ptr().align_offset(64);
            assert!(a0 < 16, "cannot align the partial sums");
            let accs = &mut acc[a0..a0 + blocks * mr * nr];
            for j in j0..j1 {
                let panel = kernel.panel(j);
                let tail = Tail {
                    bias: bias_pad[j * nr..].as_ptr(),
                    relu,
                    ldo: if pool { nr } else { cout },
                    cols: nr.min(cout - j * nr),
                    stream,
                };
                // LOOP 2: channel chunks (9*kc panel rows, contiguous).
                let mut c0 = 0;
                while c0 < cin {
                    let kc = if row_taps { tap_len } else { kc_max.min(cin - c0) };
                    let bchunk = panel[9 * c0 * nr..].as_ptr();
                    let (first, last) = (c0 == 0, c0 + kc >= cin);
                    // LOOP 3 (the job's pixel blocks), 4 (taps) and 5
                    // (channels) run in one call, on the ISA's kernel.
                    let run = Blocks {
                        ptrs: ptrs.as_ptr(),
                        masks: masks.as_ptr(),
                        count: masks.len(),
                        taps,
                        c0,
                        kc,
                        b: bchunk,
                        acc: accs.as_mut_ptr(),
                        first,
                        // SAFETY (of the add): p0 < m, j*nr < cout.
                        out: last.then(|| match pool {
                            true => full.as_mut_ptr(),
                            false => unsafe { out_ptr.get().add(p0 * cout + j * nr) },
                        }),
                        rows: p1 - p0,
                    };
                    // SAFETY: the ISA was checked above; each pointer
                    // addresses `cin` floats (an input row or `zeros`), or
                    // 3*cin (three input pixels of a row, an edge copy in
                    // `col`, or `zeros`), so c0..c0+kc is in bounds; the
                    // chunk holds taps*kc*nr floats of the panel; each
                    // block's partial sums are mr*nr floats, 64-byte
                    // aligned; the last chunk writes rows p0..p1, columns
                    // j*nr..j*nr+cols of `out`, which only this job writes.
                    unsafe { run_blocks(isa, mr, &run, &tail) };
                    c0 += kc;
                }
                if pool {
                    // SAFETY: the panel's columns of the job's pooled
                    // pixels, which only this job writes.
                    unsafe {
                        pool_panel(
                            &full[..(p1 - p0) * nr],
                            nr,
                            tail.cols,
                            w,
                            p0,
                            cout,
                            out_ptr.get().add(j * nr),
                        )
                    };
                }
            }
            // Streaming stores are weakly ordered: drain them before the
            // job counts as done (and another thread reads the output).
            #[cfg(target_arch = "x86_64")]
            if stream {
                // SAFETY: SSE is part of x86-64.
                unsafe { std::arch::x86_64::_mm_sfence() };
            }
        },
    );
}

/// `out` (m, Cout) rows of stride `ldo` = `a` (m, K) rows of stride `lda`
/// x `b` (K, Cout), one thread, on `b`'s ISA: the direct kernel's
/// micro-kernel as a plain GEMM (one tap, row pointers into `a`). Columns
/// of panels `panels` only. `scratch` is reused across calls. Each output is
/// one fixed-order sum (chunks of K in order), whoever calls.
///
/// # Safety
/// `out` addresses `m` rows of stride `ldo` with the panels' columns
/// writable and not read or written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_packed(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedKernel,
    panels: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
    scratch: &mut GemmScratch,
) {
    let isa = b.isa;
    assert!(
        isa.supported(),
        "gemm_packed: this CPU cannot run the {} kernel",
        isa.name()
    );
    assert_eq!(b.taps, 1, "gemm_packed: the matrix was packed as a conv kernel");
    let Geometry { mr, nr, kc: kc_max } = Geometry::of(isa);
    let k = b.k;
    if m == 0 || k == 0 {
        return;
    }
    assert!(
        lda >= k && a.len() >= (m - 1) * lda + k,
        "gemm_packed: A is not ({m}, {k})"
    );
    assert!(panels.end <= b.panels(), "gemm_packed: panel range past the matrix");
    let blocks = m.div_ceil(mr);
    // Row pointers; rows past m repeat the last row (their sums are never
    // stored).
    scratch.ptrs.clear();
    scratch
        .ptrs
        .extend((0..blocks * mr).map(|r| a[r.min(m - 1) * lda..].as_ptr()));
    if scratch.acc.len() < blocks * mr * nr + 16 {
        scratch.acc.resize(blocks * mr * nr + 16, 0.0);
    }
    scratch.masks.clear();
    scratch.masks.resize(blocks, 1);
    if scratch.zero_bias.len() < nr {
        scratch.zero_bias.resize(nr, 0.0);
    }
    let a0 = scratch.acc.as_ptr().align_offset(64);
    assert!(a0 < 16, "cannot align the partial sums");
    let accs = &mut scratch.acc[a0..a0 + blocks * mr * nr];
    for j in panels {
        let panel = b.panel(j);
        let tail = Tail {
            bias: scratch.zero_bias.as_ptr(),
            relu: false,
            ldo,
            cols: nr.min(b.cout - j * nr),
            stream: false,
        };
        let mut c0 = 0;
        while c0 < k {
            let kc = kc_max.min(k - c0);
            let (first, last) = (c0 == 0, c0 + kc >= k);
            let run = Blocks {
                ptrs: scratch.ptrs.as_ptr(),
                masks: scratch.masks.as_ptr(),
                count: blocks,
                taps: 1,
                c0,
                kc,
                b: panel[c0 * nr..].as_ptr(),
                acc: accs.as_mut_ptr(),
                first,
                out: last.then(|| out.add(j * nr)),
                rows: m,
            };
            run_blocks(isa, mr, &run, &tail);
            c0 += kc;
        }
    }
}

/// As [`gemm_packed`] on AVX2 or AVX-512, with A already in micro-panels:
/// rows in blocks of the ISA's `mr` (6 or 12; block `row / mr` at
/// `(row / mr) * mr * k`), each block's K in groups of 8, a group mr rows x 8
/// lanes contiguous (element (row, c) at `(c / 8) * 8 * mr + (row % mr) * 8 +
/// c % 8` within its block). The mr broadcasts of a step then read one run
/// of memory (8*mr floats a group of 8 steps) instead of mr rows far apart.
/// `a` starts at the first block; `k` (the packed matrix's rows)
/// is a multiple of 8; `m` rows (blocks beyond are not read).
/// `b_from_memory`: B is too large to stay in L2 between calls (U in
/// Winograd's chunked schedule), so its next chunk is prefetched while the
/// current one runs (blocks 3-5 at 224 px 5-10% faster on AVX2); with B in
/// L2 (the fused schedule) the prefetches only cost (~5% there), and on
/// AVX-512 (calls twice as long, chunks twice as large) block4-5 measured
/// slower with them, so Winograd asks for it on AVX2 only.
///
/// # Safety
/// As [`gemm_packed`]; `a` holds `m.div_ceil(mr) * mr * k` floats.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_packed_a(
    a: &[f32],
    m: usize,
    b: &PackedKernel,
    panels: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
    scratch: &mut GemmScratch,
    b_from_memory: bool,
) {
    let isa = b.isa;
    assert!(
        matches!(isa, Isa::Avx2 | Isa::Avx512),
        "gemm_packed_a: no micro-panel kernel for {}",
        isa.name()
    );
    assert!(isa.supported(), "gemm_packed_a: this CPU cannot run {}", isa.name());
    assert_eq!(b.taps, 1, "gemm_packed_a: the matrix was packed as a conv kernel");
    let Geometry { mr, nr, kc: kc_max } = Geometry::of(isa);
    let k = b.k;
    assert!(k.is_multiple_of(8), "gemm_packed_a: K = {k} is not a multiple of 8");
    let blocks = m.div_ceil(mr);
    assert!(
        a.len() >= blocks * mr * k,
        "gemm_packed_a: A is not {blocks} blocks of {k}"
    );
    assert!(panels.end <= b.panels(), "gemm_packed_a: panel range past the matrix");
    if m == 0 || k == 0 {
        return;
    }
    if scratch.acc.len() < blocks * mr * nr + 16 {
        scratch.acc.resize(blocks * mr * nr + 16, 0.0);
    }
    if scratch.zero_bias.len() < nr {
        scratch.zero_bias.resize(nr, 0.0);
    }
    let a0 = scratch.acc.as_ptr().align_offset(64);
    assert!(a0 < 16, "cannot align the partial sums");
    let accs = &mut scratch.acc[a0..a0 + blocks * mr * nr];
    let last_panel = panels.end - 1;
    for j in panels {
        let panel = b.panel(j);
        let tail = Tail {
            bias: scratch.zero_bias.as_ptr(),
            relu: false,
            ldo,
            cols: nr.min(b.cout - j * nr),
            stream: false,
        };
        let mut c0 = 0;
        while c0 < k {
            let kc = kc_max.min(k - c0);
            let (first, last) = (c0 == 0, c0 + kc >= k);
            // With `b_from_memory`, the next chunk of B (the rest of this
            // panel, or the next panel, which follows it in memory), a
            // share of its lines before each call: the first call on a
            // chunk waited for it.
            let next =
                (b_from_memory && (!last || j < last_panel)).then(|| panel.as_ptr().wrapping_add((c0 + kc) * nr));
            let next_c0 = if last { 0 } else { c0 + kc };
            let next_len = kc_max.min(k - next_c0) * nr;
            for blk in 0..blocks {
                if let Some(nb) = next {
                    crate::tensor::sgemm::prefetch_share(nb, next_len, blk, blocks);
                }
                let g0 = blk * mr;
                let (ap, bp) = (a[blk * mr * k + c0 * mr..].as_ptr(), panel[c0 * nr..].as_ptr());
                let acc = accs[blk * mr * nr..].as_mut_ptr();
                let out = last.then(|| (out.add(g0 * ldo + j * nr), mr.min(m - g0)));
                match isa {
                    Isa::Avx512 => kernel_avx512_pa(ap, kc, bp, acc, first, out, &tail),
                    Isa::Avx2 => kernel_avx2_pa(ap, kc, bp, acc, first, out, &tail),
                    Isa::Generic => unreachable!("refused above"),
                }
            }
            c0 += kc;
        }
    }
}

/// The AVX2 kernels' end of a chunk: the sums back to `acc`, or (the last
/// chunk, `out` given) plus the bias, ReLU when asked, masked stores of
/// `rows` rows. A macro for the reason `finish_avx512!` is one (as a
/// function it stayed out of line, the 12 sums passed through memory).
#[cfg(target_arch = "x86_64")]
macro_rules! finish_avx2 {
    ($s0:expr, $s1:expr, $acc:expr, $out:expr, $tail:expr) => {{
        use std::arch::x86_64::*;
        let (s0, s1, acc, tail): (&[__m256; 6], &[__m256; 6], *mut f32, &Tail) = (&$s0, &$s1, $acc, $tail);
        if let Some((out, rows)) = $out {
            let bias0 = _mm256_loadu_ps(tail.bias);
            let bias1 = _mm256_loadu_ps(tail.bias.add(8));
            let zero = _mm256_setzero_ps();
            let cols = tail.cols;
            // Lane i of a mask is stored when its sign bit is set.
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols.min(8) as i32), lane);
            let m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols.saturating_sub(8).min(8) as i32), lane);
            for r in 0..6 {
                if r >= rows {
                    break;
                }
                let mut v0 = _mm256_add_ps(s0[r], bias0);
                let mut v1 = _mm256_add_ps(s1[r], bias1);
                let o: *mut f32 = out.add(r * tail.ldo);
                if tail.relu {
                    // max(v, 0) with 0 second returns 0 for NaN, as f32::max does.
                    v0 = _mm256_max_ps(v0, zero);
                    v1 = _mm256_max_ps(v1, zero);
                }
                if tail.stream && cols >= 16 {
                    // 64-byte aligned rows (see `conv3x3_direct`).
                    _mm256_stream_ps(o, v0);
                    _mm256_stream_ps(o.add(8), v1);
                } else if cols >= 16 {
                    _mm256_storeu_ps(o, v0);
                    _mm256_storeu_ps(o.add(8), v1);
                } else {
                    _mm256_maskstore_ps(o, m0, v0);
                    _mm256_maskstore_ps(o.add(8), m1, v1);
                }
            }
        } else {
            for r in 0..6 {
                _mm256_store_ps(acc.add(r * 16), s0[r]);
                _mm256_store_ps(acc.add(r * 16 + 8), s1[r]);
            }
        }
    }};
}

/// The AVX-512 kernels' end of a chunk: the sums back to `acc`, or (the
/// last chunk, `out` given) plus the bias, ReLU when asked, masked stores
/// of `rows` rows. A macro, so that it always expands inside the kernel:
/// as a function LLVM kept the 24 sums on the stack for its loop to `rows`
/// (stored and reloaded on every block: with the RGB layer's 27-step
/// blocks, about as much as the FMAs). Rows have constant indices here,
/// those past `rows` skipped by a branch.
#[cfg(target_arch = "x86_64")]
macro_rules! finish_avx512 {
    ($mr:expr, $s0:expr, $s1:expr, $acc:expr, $out:expr, $tail:expr) => {{
        use std::arch::x86_64::*;
        let (s0, s1, acc, tail): (&[__m512; $mr], &[__m512; $mr], *mut f32, &Tail) = (&$s0, &$s1, $acc, $tail);
        if let Some((out, rows)) = $out {
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
            for r in 0..$mr {
                if r >= rows {
                    break;
                }
                let mut v0 = _mm512_add_ps(s0[r], bias0);
                let mut v1 = _mm512_add_ps(s1[r], bias1);
                let o: *mut f32 = out.add(r * tail.ldo);
                if tail.relu {
                    // max(v, 0) returns 0 for NaN, as f32::max does.
                    v0 = _mm512_max_ps(v0, zero);
                    v1 = _mm512_max_ps(v1, zero);
                }
                if tail.stream && cols >= 32 {
                    // 64-byte aligned rows (see `conv3x3_direct`).
                    _mm512_stream_ps(o, v0);
                    _mm512_stream_ps(o.add(16), v1);
                } else if cols >= 32 {
                    // Whole rows unmasked: on Zen 5 a masked store, even
                    // with every lane on, cost the RGB layer a third of its
                    // time (16 -> 10 ms at 224 px, batch 16).
                    _mm512_storeu_ps(o, v0);
                    _mm512_storeu_ps(o.add(16), v1);
                } else {
                    _mm512_mask_storeu_ps(o, m0, v0);
                    _mm512_mask_storeu_ps(o.add(16), m1, v1);
                }
            }
        } else {
            for r in 0..$mr {
                _mm512_store_ps(acc.add(r * 32), s0[r]);
                _mm512_store_ps(acc.add(r * 32 + 16), s1[r]);
            }
        }
    }};
}

/// The AVX2 6 x 16 micro-kernel reading A from a micro-panel (see
/// [`gemm_packed_a`]); `kc` a multiple of 8. Same sums, same order, as
/// `kernel_avx2` with one tap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2_pa(
    a: *const f32,
    kc: usize,
    b: *const f32,
    acc: *mut f32,
    first: bool,
    out: Option<(*mut f32, usize)>,
    tail: &Tail,
) {
    let (mut s0, mut s1) = load_avx2(acc, first);
    // The same groups of 8 steps as our SGEMM's kernel, in assembly (as a
    // Rust loop over k it ran clean, but unrolled LLVM spilled sums; the
    // assembly is both unrolled and clean).
    let (mut ap, mut bp) = (a, b);
    crate::tensor::sgemm::fma_groups(&mut ap, &mut bp, kc / 8, &mut s0, &mut s1);
    finish_avx2!(s0, s1, acc, out, tail);
}

/// The AVX-512 12 x 32 micro-kernel reading A from a micro-panel (see
/// [`gemm_packed_a`]); `kc` a multiple of 8. Same sums, same order, as
/// `kernel_avx512` with one tap: one pointer walks A (96 floats a group of
/// 8 steps), so no row pointer is kept or spilled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512_pa(
    a: *const f32,
    kc: usize,
    b: *const f32,
    acc: *mut f32,
    first: bool,
    out: Option<(*mut f32, usize)>,
    tail: &Tail,
) {
    use std::arch::x86_64::*;
    const MR: usize = 12;
    const NR: usize = 32;
    let (mut s0, mut s1) = load_avx512::<MR>(acc, first);
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc / 8 {
        for l in 0..8 {
            let b0 = _mm512_load_ps(bp.add(l * NR));
            let b1 = _mm512_load_ps(bp.add(l * NR + 16));
            for r in 0..MR {
                let av = _mm512_set1_ps(*ap.add(r * 8 + l));
                s0[r] = _mm512_fmadd_ps(av, b0, s0[r]);
                s1[r] = _mm512_fmadd_ps(av, b1, s1[r]);
            }
        }
        ap = ap.add(8 * MR);
        bp = bp.add(8 * NR);
    }
    finish_avx512!(MR, s0, s1, acc, out, tail);
}

/// Scratch of [`gemm_packed`], kept by each worker across calls.
#[derive(Default)]
pub(crate) struct GemmScratch {
    ptrs: Vec<*const f32>,
    acc: Vec<f32>,
    zero_bias: Vec<f32>,
    masks: Vec<u16>,
}

/// One micro-kernel call: adds one channel chunk to an `mr` x `nr` block.
///
/// `ptrs` holds the block's `taps` x mr row pointers (tap-major; 9 taps, or
/// 3 row taps under [`MIN_CIN`] channels, 1 for a GEMM); taps whose bit is
/// clear in `mask` are skipped. The
/// chunk covers channels c0..c0+kc of every tap; `b` is the panel's
/// matching taps x kc x nr rows (tap-major). `acc` holds the block's mr x nr
/// partial sums (64-byte aligned): read unless `first`, written back unless
/// `out` is given; then (the last chunk) bias and ReLU are applied and
/// `rows` rows go to `out` instead.
struct Call {
    ptrs: *const *const f32,
    taps: usize,
    mask: u16,
    c0: usize,
    kc: usize,
    b: *const f32,
    acc: *mut f32,
    first: bool,
    out: Option<(*mut f32, usize)>,
}

/// How the last reduction chunk of a block leaves the kernel: plus the bias
/// (padded to `nr`), ReLU or not, into `out` rows of stride `ldo`, the
/// first `cols` columns.
struct Tail {
    bias: *const f32,
    relu: bool,
    ldo: usize,
    cols: usize,
    /// Whole rows as streaming stores (their starts 64-byte aligned; x86
    /// kernels only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    stream: bool,
}

/// One chunk over a job's consecutive pixel blocks (LOOP 3 in one call, so
/// a block costs no call, dispatch or argument set-up: the RGB layer's
/// chunk is only 27 steps). Block i is the [`Call`] with row pointers
/// `ptrs[i*taps*mr..]`, mask `masks[i]`, partial sums `acc[i*mr*nr..]`,
/// and on the last chunk output rows `i*mr..` of `out` (stride
/// `tail.ldo`), `rows` rows in all.
struct Blocks {
    ptrs: *const *const f32,
    masks: *const u16,
    count: usize,
    taps: usize,
    c0: usize,
    kc: usize,
    b: *const f32,
    acc: *mut f32,
    first: bool,
    out: Option<*mut f32>,
    rows: usize,
}

/// Block `i` of `run` as one micro-kernel call for geometry (mr, nr).
///
/// # Safety
/// `i < run.count`, and `run` is valid as [`Blocks`] describes.
#[inline(always)]
unsafe fn block_call(run: &Blocks, i: usize, mr: usize, nr: usize, ldo: usize) -> Call {
    Call {
        ptrs: run.ptrs.add(i * run.taps * mr),
        taps: run.taps,
        mask: *run.masks.add(i),
        c0: run.c0,
        kc: run.kc,
        b: run.b,
        acc: run.acc.add(i * mr * nr),
        first: run.first,
        out: run.out.map(|o| (o.add(i * mr * ldo), mr.min(run.rows - i * mr))),
    }
}

/// Runs every block of `run` on the micro-kernel of `isa`.
///
/// # Safety
/// The CPU supports `isa`, and for every block of `run` the pointers are
/// valid as [`Call`] describes for that ISA's [`Geometry`].
unsafe fn run_blocks(isa: Isa, mr: usize, run: &Blocks, tail: &Tail) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = mr;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if mr == 14 => kernel_avx512::<14>(run, tail),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => kernel_avx512::<12>(run, tail),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => kernel_avx2(run, tail),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512 | Isa::Avx2 => unreachable!("x86 kernels are checked as unsupported here"),
        Isa::Generic => kernel_generic(run, tail),
    }
}

/// AVX-512F: MR (12 or 14, see [`Geometry::direct`]) pixels x 32
/// channels, 2*MR zmm sums.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<const MR: usize>(run: &Blocks, tail: &Tail) {
    use std::arch::x86_64::*;
    const NR: usize = 32;
    for i in 0..run.count {
        let c = &block_call(run, i, MR, NR, tail.ldo);
        let (mut s0, mut s1) = load_avx512::<MR>(c.acc, c.first);
        for t in 0..c.taps {
            if c.mask & (1 << t) == 0 {
                continue;
            }
            let a: [*const f32; MR] = std::array::from_fn(|r| (*c.ptrs.add(t * MR + r)).add(c.c0));
            let mut bp = c.b.add(t * c.kc * NR);
            for ci in 0..c.kc {
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
        finish_avx512!(MR, s0, s1, c.acc, c.out, tail);
    }
}

/// The AVX-512 kernels' 2*MR sums: zeros on the first chunk, else the
/// partial sums in `acc` (64-byte aligned, MR x 32).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_avx512<const MR: usize>(
    acc: *const f32,
    first: bool,
) -> ([std::arch::x86_64::__m512; MR], [std::arch::x86_64::__m512; MR]) {
    use std::arch::x86_64::*;
    let mut s0 = [_mm512_setzero_ps(); MR];
    let mut s1 = [_mm512_setzero_ps(); MR];
    if !first {
        for r in 0..MR {
            s0[r] = _mm512_load_ps(acc.add(r * 32));
            s1[r] = _mm512_load_ps(acc.add(r * 32 + 16));
        }
    }
    (s0, s1)
}

/// AVX2 + FMA: 6 pixels x 16 channels, 12 ymm sums (16 ymm registers: 12
/// sums, 2 kernel vectors, 1 broadcast).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(run: &Blocks, tail: &Tail) {
    use std::arch::x86_64::*;
    const MR: usize = 6;
    const NR: usize = 16;
    for i in 0..run.count {
        let c = &block_call(run, i, MR, NR, tail.ldo);
        let (mut s0, mut s1) = load_avx2(c.acc, c.first);
        for t in 0..c.taps {
            if c.mask & (1 << t) == 0 {
                continue;
            }
            let a: [*const f32; MR] = std::array::from_fn(|r| (*c.ptrs.add(t * MR + r)).add(c.c0));
            let mut bp = c.b.add(t * c.kc * NR);
            for ci in 0..c.kc {
                let b0 = _mm256_load_ps(bp);
                let b1 = _mm256_load_ps(bp.add(8));
                for r in 0..MR {
                    let av = _mm256_broadcast_ss(&*a[r].add(ci));
                    s0[r] = _mm256_fmadd_ps(av, b0, s0[r]);
                    s1[r] = _mm256_fmadd_ps(av, b1, s1[r]);
                }
                bp = bp.add(NR);
            }
        }
        finish_avx2!(s0, s1, c.acc, c.out, tail);
    }
}

/// The AVX2 kernels' 12 sums: zeros on the first chunk, else the partial
/// sums in `acc` (64-byte aligned, 6 x 16).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_avx2(acc: *const f32, first: bool) -> ([std::arch::x86_64::__m256; 6], [std::arch::x86_64::__m256; 6]) {
    use std::arch::x86_64::*;
    let mut s0 = [_mm256_setzero_ps(); 6];
    let mut s1 = [_mm256_setzero_ps(); 6];
    if !first {
        for r in 0..6 {
            s0[r] = _mm256_load_ps(acc.add(r * 16));
            s1[r] = _mm256_load_ps(acc.add(r * 16 + 8));
        }
    }
    (s0, s1)
}

/// Portable Rust, the AVX2 geometry (6 x 16) in plain arrays: runs on any
/// target, and is the reference the SIMD kernels are compared with.
unsafe fn kernel_generic(run: &Blocks, tail: &Tail) {
    const MR: usize = 6;
    const NR: usize = 16;
    for i in 0..run.count {
        let c = &block_call(run, i, MR, NR, tail.ldo);
        let mut s = [[0.0f32; NR]; MR];
        if !c.first {
            for (r, row) in s.iter_mut().enumerate() {
                row.copy_from_slice(std::slice::from_raw_parts(c.acc.add(r * NR), NR));
            }
        }
        for t in 0..c.taps {
            if c.mask & (1 << t) == 0 {
                continue;
            }
            let a: [&[f32]; MR] =
                std::array::from_fn(|r| std::slice::from_raw_parts((*c.ptrs.add(t * MR + r)).add(c.c0), c.kc));
            let b = std::slice::from_raw_parts(c.b.add(t * c.kc * NR), c.kc * NR);
            for (ci, brow) in b.chunks_exact(NR).enumerate() {
                for r in 0..MR {
                    let av = a[r][ci];
                    for (sv, &bv) in s[r].iter_mut().zip(brow) {
                        *sv += av * bv;
                    }
                }
            }
        }
        let Some((out, rows)) = c.out else {
            for (r, row) in s.iter().enumerate() {
                std::slice::from_raw_parts_mut(c.acc.add(r * NR), NR).copy_from_slice(row);
            }
            continue;
        };
        let bias = std::slice::from_raw_parts(tail.bias, NR);
        for (r, row) in s.iter().enumerate().take(rows.min(MR)) {
            let o = std::slice::from_raw_parts_mut(out.add(r * tail.ldo), tail.cols);
            for ((ov, &sv), &bv) in o.iter_mut().zip(row).zip(bias) {
                let v = sv + bv;
                *ov = if tail.relu { v.max(0.0) } else { v };
            }
        }
    }
}
