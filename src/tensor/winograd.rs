//! Winograd F(4x4, 3x3) for the stride-1 3x3 "same" convolutions.
//!
//! A 4x4 block of outputs needs 4*4*9 = 144 multiplies per (input, output)
//! channel pair done directly; Winograd's minimal filtering (Lavin & Gray,
//! *Fast Algorithms for Convolutional Neural Networks*, 2015) needs 36:
//!
//! ```text
//! Y (4x4) = A^T [ U (6x6) .* V (6x6) ] A,   U = G g G^T,   V = B^T d B
//! ```
//! with g the 3x3 kernel, d the 6x6 input tile (rows ty*4-1 .. ty*4+4 and the
//! same columns, zeros off the image) and the matrices below (interpolation
//! points 0, 1, -1, 2, -2, infinity). Summed over input channels, the
//! elementwise products become 36 independent GEMMs, one per tile position
//! xi = (i, j):
//!
//! ```text
//! M[xi] (tiles, Cout) = V[xi] (tiles, Cin) x U[xi] (Cin, Cout)
//! ```
//! which run on the direct kernel's micro-kernels ([`super::direct`], one
//! tap, packed panels); on AVX2 and AVX-512 the input transform writes V
//! straight into the micro-panels of 6 or 12 rows the kernel reads as one
//! stream (`gemm_packed_a`), which measured 10-25% faster on block4/5
//! shapes on AVX2. So a layer is three passes over a chunk of tiles,
//! each parallel over fixed partitions:
//!
//! 1. input transform: tile -> V[xi][tile][c], vectorised over channels;
//! 2. 36 GEMMs, jobs = (xi, run of tiles, run of panels);
//! 3. output transform: M -> Y, plus the bias, ReLU, clipped at the image
//!    edge (a side that is not a multiple of 4 computes a padded tile); or,
//!    fused with the 2x2 max-pool after the conv ([`conv3x3_winograd_pool2`]),
//!    each tile pooled as it is written (its origin is even, so every
//!    pooling window lies inside one tile).
//!
//! Chunks of tiles are sized so V and M of a chunk stay in the last-level
//! cache ([`CHUNK_BYTES`]), whatever the batch and image size, unless the
//! layer's U is larger (block4/5: 36 MB), which is re-read once per chunk
//! (see [`chunk_tiles`]). The kernel
//! transform U is computed once per layer (in f64, then rounded) and packed
//! (see [`WinogradKernel`]; `Vgg16::prepare` keeps it for all batches).
//!
//! Accuracy: the transforms add rounding; measured errors are in
//! BENCHMARKS.md and bounded by `tol::WINOGRAD_FORWARD` in the tests (the
//! VGG-16 parity test holds them to the fixtures' 1e-4 bound).
//!
//! The weight gradient of a layer uses the same algebra backwards
//! ([`conv3x3_winograd_dw`]): with dM = A dY A^T for each 4x4 tile of the
//! output gradient, dU[xi] (Cin, Cout) = sum over tiles V[xi]^T dM[xi] (36
//! GEMMs, 4x fewer multiplies than im2col's dW), then dW = G^T dU G.
//!
//! Every output is one fixed-order sum (chunks of Cin in order inside a GEMM,
//! then the fixed output transform) computed by one job, so results do not
//! depend on the thread count.

#[cfg(target_arch = "x86_64")]
use super::direct::gemm_packed_a;
use super::direct::{gemm_packed, GemmScratch, Geometry, PackedKernel, SendPtr};
use super::dispatch::Isa;
use ndarray::ArrayView4;
use rayon::prelude::*;

/// Output tile side.
pub const M: usize = 4;
/// Input tile side (M + 3 - 1).
pub const T: usize = 6;
/// Tile positions: GEMMs per chunk.
pub const XI: usize = T * T;
/// Target bytes of one chunk's V and M together (kept in L3).
pub const CHUNK_BYTES: usize = 12 << 20;
/// Fewest input channels worth the transforms (the RGB layer is not).
pub const MIN_CIN: usize = 16;
/// Target bytes of one GEMM job's rows of V (kept in L2 across panels).
const JOB_ROWS_BYTES: usize = 192 << 10;
/// Largest U (36 * Cin * Cout floats) the fused schedule takes: it re-reads
/// all of U for every few tiles, so U must stay in L2 (block1_conv2's
/// 64 x 64 kernel is 0.6 MB, block2_conv1's 64 x 128 1.2 MB; 128 x 128 and
/// up measured no faster fused).
pub const FUSED_U_BYTES: usize = 5 << 18;
/// Target bytes of one fused job's V and M together (in L2 with U).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const FUSED_JOB_BYTES: usize = 256 << 10;

/// How [`conv3x3_winograd_scheduled`] orders the three phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WinogradSchedule {
    /// Each phase over a chunk of thousands of tiles (V and M in L3), so U
    /// is read once per chunk: for kernels too large for L2.
    Chunked,
    /// Each job takes a dozen or so tiles through all three phases with
    /// its V and M in L2: the memory-bound transforms no longer go through
    /// L3 (block1_conv2 at 224 px: 25-30% faster on an AVX-512 Xeon). Only
    /// with the micro-panel layout (x86, Cin a multiple of 8); elsewhere
    /// the chunked schedule runs.
    Fused,
}

impl WinogradSchedule {
    /// Fused where U fits [`FUSED_U_BYTES`], chunked otherwise.
    pub fn of(cin: usize, cout: usize) -> WinogradSchedule {
        if XI * cin * cout * std::mem::size_of::<f32>() <= FUSED_U_BYTES {
            WinogradSchedule::Fused
        } else {
            WinogradSchedule::Chunked
        }
    }
}

/// G (6x3): the kernel transform.
const G: [[f64; 3]; T] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// The kernel transformed and packed once: U[xi] (Cin, Cout) for the 36
/// positions, each packed as a GEMM right-hand matrix for `isa`.
pub struct WinogradKernel {
    pub isa: Isa,
    pub cin: usize,
    pub cout: usize,
    u: Vec<PackedKernel>,
}

impl WinogradKernel {
    /// Transforms a Keras kernel (3, 3, Cin, Cout): U = G g G^T per channel
    /// pair, as (G g) then (G g) G^T, on `nr` output channels at a time
    /// (contiguous in the Keras layout), written straight into the 36
    /// packed GEMM matrices, in parallel over input channels. Stage 2 re-transforms
    /// block5 after every SGD step (five times a step: three forwards, two
    /// dX), so this is kept cheap (`vgg16 bench step`).
    pub fn from_keras(isa: Isa, w: ArrayView4<f32>) -> WinogradKernel {
        let (_, _, cin, cout) = w.dim();
        let u = (0..XI).map(|_| PackedKernel::gemm_zeroed(isa, cin, cout)).collect();
        let mut k = WinogradKernel { isa, cin, cout, u };
        k.refill(w);
        k
    }

    /// [`WinogradKernel::from_keras`] of [`super::conv::flip_kernel`]`(w)`
    /// (dX's kernel, Cout -> Cin), transformed straight from the layer's
    /// own `w` (3, 3, Cin, Cout) without making the flipped copy; the same
    /// floats bit for bit.
    pub fn from_keras_flipped(isa: Isa, w: ArrayView4<f32>) -> WinogradKernel {
        let (_, _, cin, cout) = w.dim();
        let u = (0..XI).map(|_| PackedKernel::gemm_zeroed(isa, cout, cin)).collect();
        let mut k = WinogradKernel {
            isa,
            cin: cout,
            cout: cin,
            u,
        };
        k.refill_flipped(w);
        k
    }

    /// [`WinogradKernel::refill`] with [`super::conv::flip_kernel`]`(w)`,
    /// reading `w` (the layer's own, 3 x 3 x Cout' x Cin' for this Cin' ->
    /// Cout' kernel) directly.
    pub fn refill_flipped(&mut self, w: ArrayView4<f32>) {
        self.fill(w, true)
    }

    /// Transforms `w` (3, 3, Cin, Cout, the channel counts this kernel was
    /// made for) into this kernel's buffers, in place: stage 2 keeps
    /// block5's kernels across steps (36 MB a layer that a fresh
    /// allocation would have the OS zero first).
    pub fn refill(&mut self, w: ArrayView4<f32>) {
        self.fill(w, false)
    }

    fn fill(&mut self, w: ArrayView4<f32>, flipped: bool) {
        let (kh, kw, wi, wo) = w.dim();
        let (cin, cout) = if flipped { (wo, wi) } else { (wi, wo) };
        assert_eq!((kh, kw), (3, 3), "winograd: kernel must be 3x3, is {kh}x{kw}");
        assert_eq!(
            (cin, cout),
            (self.cin, self.cout),
            "winograd: refill with a {cin}x{cout} kernel, made for {}x{}",
            self.cin,
            self.cout
        );
        let w = w.as_standard_layout();
        let ws = w.as_slice().expect("standard layout");
        let nr = Geometry::of(self.isa).nr;
        // The 36 packed matrices, filled in place by jobs of CB input
        // channels: a job reads its channels' rows of W (9 runs of
        // CB * Cout floats, in order) and writes, for each panel, CB rows
        // of each of the 36 matrices (36 runs of CB * nr floats).
        // (Streaming stores measured no faster, inside the noise.)
        const CB: usize = FLIP_ROWS;
        let dst: Vec<SendPtr> = self.u.iter_mut().map(|k| SendPtr(k.data_ptr_mut())).collect();
        let dst: &[SendPtr; XI] = dst.as_slice().try_into().expect("36 matrices");
        let rows = rows_fn(self.isa, nr, flipped);
        (0..cin.div_ceil(CB)).into_par_iter().for_each(|b| {
            // SAFETY: this job writes rows b*CB.. of every panel of the 36
            // matrices (each K = cin rows of nr floats), no one else does;
            // `rows_fn` picked a build this CPU runs.
            unsafe { rows(ws, cin, cout, b * CB..(b * CB + CB).min(cin), dst) };
        });
    }
}

/// Input channels a job of the kernel transform fills (16 floats of a
/// flipped kernel's row are one cache line of the layer's own).
const FLIP_ROWS: usize = 16;

/// [`transform_rows`] for panel width `nr` (of the flipped kernel when
/// `flipped`), compiled for AVX2 when this CPU has it (the same operations
/// in the same order either way).
type RowsFn = unsafe fn(&[f32], usize, usize, std::ops::Range<usize>, &[SendPtr; XI]);
fn rows_fn(isa: Isa, nr: usize, flipped: bool) -> RowsFn {
    if flipped {
        rows_fn_of::<true>(isa, nr)
    } else {
        rows_fn_of::<false>(isa, nr)
    }
}

fn rows_fn_of<const FLIP: bool>(isa: Isa, nr: usize) -> RowsFn {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        return match nr {
            16 => transform_rows_avx512::<16, FLIP>,
            32 => transform_rows_avx512::<32, FLIP>,
            _ => unreachable!("panel width {nr}"),
        };
    }
    let _ = isa;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return match nr {
            16 => transform_rows_avx2::<16, FLIP>,
            32 => transform_rows_avx2::<32, FLIP>,
            _ => unreachable!("panel width {nr}"),
        };
    }
    match nr {
        16 => transform_rows::<16, FLIP>,
        32 => transform_rows::<32, FLIP>,
        _ => unreachable!("panel width {nr}"),
    }
}

/// [`transform_rows`] compiled for AVX-512 (8 doubles a vector, twice
/// AVX2's; the same operations in the same order, so the same results).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_rows_avx512<const NR: usize, const FLIP: bool>(
    ws: &[f32],
    cin: usize,
    cout: usize,
    cis: std::ops::Range<usize>,
    dst: &[SendPtr; XI],
) {
    transform_rows::<NR, FLIP>(ws, cin, cout, cis, dst)
}

/// [`transform_rows`] compiled for AVX2 (the same operations in the same
/// order, without FMA contraction: the same results as the portable build).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transform_rows_avx2<const NR: usize, const FLIP: bool>(
    ws: &[f32],
    cin: usize,
    cout: usize,
    cis: std::ops::Range<usize>,
    dst: &[SendPtr; XI],
) {
    transform_rows::<NR, FLIP>(ws, cin, cout, cis, dst)
}

/// Fills rows `cis` (input channels) of every panel of the 36 packed
/// matrices `dst` (K = cin rows of NR floats a panel) with U = G g G^T:
/// row ci of panel j of matrix i*T + j' gets U[i][j'][ci][j*NR..j*NR+NR]
/// (past Cout, the zero kernel's zeros). NR is the packing's panel width,
/// fixed at compile time: each (channel, panel) is one straight-line
/// transform per lane, in f64, which the compiler vectorises across the NR
/// lanes, and 36 fixed-size row stores. (Written as loops over G with zero
/// tests, this was ~30 ms a 512 x 512 layer, mostly branches and a
/// `memmove` call per row; stage 2 runs it five times a step.)
///
/// With FLIP, `ws` is the layer's own kernel (3, 3, cout, cin) and the
/// kernel transformed is its flip (`flip_kernel`): tap t of (ci, co) is
/// `ws[8 - t][co][ci]`. The job's channels `cis` (at most [`FLIP_ROWS`])
/// are then contiguous in `ws`: each panel first copies, per tap and
/// lane, that run of them into a block, and the rows read the block.
///
/// # Safety
/// Each `dst[xi]` points at `cout.div_ceil(NR) * cin * NR` writable floats,
/// and no one else touches rows `cis` of them meanwhile.
#[inline(always)]
unsafe fn transform_rows<const NR: usize, const FLIP: bool>(
    ws: &[f32],
    cin: usize,
    cout: usize,
    cis: std::ops::Range<usize>,
    dst: &[SendPtr; XI],
) {
    let nb = cis.len();
    assert!(
        !FLIP || nb <= FLIP_ROWS,
        "winograd: a flipped job of {nb} > {FLIP_ROWS} channels"
    );
    // FLIP: block[r][t][lane] = ws[8 - t][c0 + lane][cis.start + r], the
    // transpose made while copying, so each row below reads whole lanes.
    let mut block = if FLIP {
        vec![[[0.0f32; NR]; 9]; FLIP_ROWS]
    } else {
        Vec::new()
    };
    for j in 0..cout.div_ceil(NR) {
        let c0 = j * NR;
        let cols = NR.min(cout - c0);
        if FLIP {
            for t in 0..9 {
                let tap = &ws[(8 - t) * cout * cin..(9 - t) * cout * cin];
                for (r, br) in block.iter_mut().enumerate().take(nb) {
                    let col = &tap[c0 * cin + cis.start + r..];
                    for (lane, v) in br[t].iter_mut().enumerate().take(cols) {
                        *v = col[lane * cin];
                    }
                }
            }
        }
        for ci in cis.clone() {
            if FLIP {
                // Lanes past Cout stay zero: no job of this panel wrote them.
                let g = block[ci - cis.start];
                transform_store::<NR>(g, j, cin, ci, dst);
                continue;
            }
            // g[t][lane]: tap t of output channel c0 + lane (built whole,
            // not zeroed first: that was a `memset` a row).
            let g: [[f32; NR]; 9] = std::array::from_fn(|t| {
                let at = (t * cin + ci) * cout + c0;
                if cols == NR {
                    // A fixed-size copy (a runtime length is a `memmove` call).
                    ws[at..at + NR].try_into().expect("NR floats")
                } else {
                    let mut gt = [0.0f32; NR];
                    gt[..cols].copy_from_slice(&ws[at..at + cols]);
                    gt
                }
            });
            transform_store::<NR>(g, j, cin, ci, dst);
        }
    }
}

/// U = G g G^T of the NR kernels `g` (tap-major, a lane per output
/// channel), stored as row `ci` of panel `j` of the 36 matrices `dst`.
///
/// # Safety
/// As [`transform_rows`]: row `ci` of panel `j` is inside every `dst[xi]`.
#[inline(always)]
unsafe fn transform_store<const NR: usize>(g: [[f32; NR]; 9], j: usize, cin: usize, ci: usize, dst: &[SendPtr; XI]) {
    // Every element of u is written below: left uninitialised rather than
    // zeroed (36 x NR floats a row: 3% of a small stage-2 step in `memset`).
    let mut u = [[std::mem::MaybeUninit::<f32>::uninit(); NR]; XI];
    for lane in 0..NR {
        let tile = kernel_tile(std::array::from_fn(|t| g[t][lane] as f64));
        for (row, v) in u.iter_mut().zip(tile) {
            row[lane].write(v as f32);
        }
    }
    for (d, row) in dst.iter().zip(&u) {
        // SAFETY: row ci of panel j, inside the matrix (the caller's); all
        // NR lanes of `row` were written above.
        d.get()
            .add((j * cin + ci) * NR)
            .cast::<[std::mem::MaybeUninit<f32>; NR]>()
            .write_unaligned(*row);
    }
}

/// G applied to one column (a, b, c) of a 3x3 kernel: the kernel's values
/// at the points 0, 1, -1, 2, -2 and infinity, scaled (the rows of [`G`]).
#[inline(always)]
fn g_col(a: f64, b: f64, c: f64) -> [f64; T] {
    // Products with 1/6 rather than divisions (a division is several times
    // the cost, and this runs 54 of them per 3x3 kernel); in f64 the
    // difference never reaches the f32 result's rounding.
    const SIXTH: f64 = 1.0 / 6.0;
    let (s, q) = (a + c, 0.25 * a + c);
    [
        0.25 * a,
        -(s + b) * SIXTH,
        -(s - b) * SIXTH,
        (q + 0.5 * b) * SIXTH,
        (q - 0.5 * b) * SIXTH,
        c,
    ]
}

/// U = G g G^T (6x6, row-major) of one 3x3 kernel g (row-major).
#[inline(always)]
fn kernel_tile(g: [f64; 9]) -> [f64; XI] {
    // Columns first: w1 (6x3) = G g.
    let c: [[f64; T]; 3] = std::array::from_fn(|b| g_col(g[b], g[3 + b], g[6 + b]));
    // Then rows: U[i] = G w1[i]^T.
    let mut u = [0.0f64; XI];
    for i in 0..T {
        let r = g_col(c[0][i], c[1][i], c[2][i]);
        u[i * T..(i + 1) * T].copy_from_slice(&r);
    }
    u
}

/// Tiles per chunk for `tiles` tiles of these channel counts: the chunks
/// are as few as [`CHUNK_BYTES`] of V and M allow, but never so small that
/// re-reading U (36 * Cin * Cout floats, once per chunk) costs more than
/// the chunk's own V and M traffic; then balanced, so no chunk is a sliver.
/// A multiple of `mr`.
pub fn chunk_tiles(tiles: usize, cin: usize, cout: usize, mr: usize) -> usize {
    let per_tile = (XI * (cin + cout) * std::mem::size_of::<f32>()).max(1);
    let u_bytes = XI * cin * cout * std::mem::size_of::<f32>();
    let max_tiles = (CHUNK_BYTES.max(u_bytes) / per_tile).max(mr);
    let chunks = tiles.div_ceil(max_tiles).max(1);
    tiles.div_ceil(chunks).div_ceil(mr) * mr
}

/// `out` (N*H*W, Cout) = conv3x3(x, kernel) + bias, then ReLU when `relu`.
/// `x` is NHWC (n, h, w, cin) as a flat slice; every element of `out` is
/// written once and none is read. The schedule is [`WinogradSchedule::of`]
/// the kernel's channels.
pub fn conv3x3_winograd(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    kernel: &WinogradKernel,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let schedule = WinogradSchedule::of(kernel.cin, kernel.cout);
    conv3x3_winograd_scheduled(x, dims, kernel, bias, relu, out, schedule, false);
}

/// [`conv3x3_winograd`] followed by a 2x2 max-pool (stride 2), fused: the
/// output transform pools each 4x4 tile (bias and ReLU applied) into 2x2
/// pooled pixels as it goes, so the full-size output is never written.
/// `out` is (N*H/2*W/2, Cout); H and W must be even. The same values as
/// the conv then `maxpool2x2`, bit for bit.
pub fn conv3x3_winograd_pool2(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    kernel: &WinogradKernel,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let schedule = WinogradSchedule::of(kernel.cin, kernel.cout);
    conv3x3_winograd_scheduled(x, dims, kernel, bias, relu, out, schedule, true);
}

/// [`conv3x3_winograd`] (or, with `pool`, [`conv3x3_winograd_pool2`]) on a
/// given schedule; both schedules give the same bits (each output's sums
/// run in the same order), which the tests check.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_winograd_scheduled(
    x: &[f32],
    (n, h, w, cin): (usize, usize, usize, usize),
    kernel: &WinogradKernel,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
    schedule: WinogradSchedule,
    pool: bool,
) {
    let isa = kernel.isa;
    assert!(
        isa.supported(),
        "conv3x3_winograd: this CPU cannot run the {} kernel",
        isa.name()
    );
    let cout = kernel.cout;
    assert_eq!(
        kernel.cin, cin,
        "conv3x3_winograd: input has {cin} channels, kernel expects {}",
        kernel.cin
    );
    assert_eq!(
        x.len(),
        n * h * w * cin,
        "conv3x3_winograd: input is not (n, h, w, cin)"
    );
    assert!(
        !pool || (h % 2 == 0 && w % 2 == 0),
        "conv3x3_winograd_pool2: {h} x {w} is not even on both sides"
    );
    // The output's sides: pooled, half the input's.
    let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
    assert_eq!(
        out.len(),
        n * oh * ow * cout,
        "conv3x3_winograd: output is not (n*{oh}*{ow}, cout)"
    );
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            cout,
            "conv3x3_winograd: bias has {} entries, expected {cout}",
            b.len()
        );
    }
    if n * h * w == 0 || cout == 0 {
        return;
    }
    // AVX2 with whole 8-channel groups: V in micro-panels (see
    // `gemm_packed_a`), read as one stream by the kernel.
    let packed = cfg!(target_arch = "x86_64") && isa != Isa::Generic && cin.is_multiple_of(8);
    let zero_bias = vec![0.0f32; cout];
    let bias = bias.unwrap_or(&zero_bias);
    let g = Geometry::of(isa);
    let (ty, tx) = (h.div_ceil(M), w.div_ceil(M));
    let tiles = n * ty * tx;
    #[cfg(target_arch = "x86_64")]
    if packed && schedule == WinogradSchedule::Fused {
        let geom = (n, h, w, ty, tx);
        let out = SendPtr(out.as_mut_ptr().cast::<f32>());
        // Tiles a job: whole micro-panels, V and M within FUSED_JOB_BYTES.
        let per_tile = XI * (cin + cout) * std::mem::size_of::<f32>();
        let bt = (FUSED_JOB_BYTES / per_tile).max(g.mr) / g.mr * g.mr;
        let panels = cout.div_ceil(g.nr);
        (0..tiles.div_ceil(bt))
            .into_par_iter()
            .for_each_init(GemmScratch::default, |gemm_scratch, b| {
                let (t0, nt) = (b * bt, bt.min(tiles - b * bt));
                // V (XI, bt, cin), M (XI, bt, cout): this thread's, kept
                // across jobs and calls as in the chunked schedule.
                let mut scratch = Scratch::take(XI * bt * cin, XI * bt * cout);
                let (v, mm) = scratch.parts();
                for t in 0..nt {
                    // SAFETY: tile t writes row t of this job's V only.
                    unsafe { input_tile(isa, x, geom, cin, t0 + t, v.as_mut_ptr(), t, bt, true) };
                }
                let rows = nt.div_ceil(g.mr) * g.mr;
                for (xi, u) in kernel.u.iter().enumerate() {
                    let a = &v[xi * bt * cin..(xi * bt + rows) * cin];
                    // SAFETY: rows 0..nt of this job's M[xi].
                    unsafe {
                        gemm_packed_a(
                            a,
                            nt,
                            u,
                            0..panels,
                            mm.as_mut_ptr().add(xi * bt * cout),
                            cout,
                            gemm_scratch,
                            false,
                        )
                    };
                }
                for t in 0..nt {
                    // SAFETY: tile t0+t writes its own output pixels only.
                    unsafe { output_tile(isa, mm, geom, cout, t, bt, t0 + t, bias, relu, pool, out.get()) };
                }
            });
        return;
    }
    let _ = schedule;
    let chunk = chunk_tiles(tiles, cin, cout, g.mr);
    // V: (XI, chunk, cin); M: (XI, chunk, cout). Reused across chunks and,
    // kept by the calling thread, across calls ([`Scratch`]): the
    // transforms fill whole rows of V, the GEMMs whole rows of M, before
    // any is read (the micro-panel GEMM also reads the last block's
    // padding rows, whose products are never stored).
    let mut scratch = Scratch::take(XI * chunk * cin, XI * chunk * cout);
    let (v, mm) = scratch.parts();
    let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
    let geom = (n, h, w, ty, tx);
    // Rows of V a GEMM job takes, and the panel runs that share a row run.
    let job_rows = ((JOB_ROWS_BYTES / (cin * 4)).max(g.mr) / g.mr * g.mr).min(chunk);
    let panels = cout.div_ceil(g.nr);
    for t0 in (0..tiles).step_by(chunk) {
        let nt = chunk.min(tiles - t0);
        // 1. Input transform, one job per run of tiles.
        {
            let vp = SendPtr(v.as_mut_ptr());
            (0..nt.div_ceil(16)).into_par_iter().for_each(|b| {
                for t in b * 16..((b + 1) * 16).min(nt) {
                    // SAFETY: tile t writes V[.][t][..] only.
                    unsafe { input_tile(isa, x, geom, cin, t0 + t, vp.get(), t, chunk, packed) };
                }
            });
        }
        // 2. The 36 GEMMs: M[xi] (nt, cout) = V[xi] (nt, cin) x U[xi].
        {
            let row_jobs = nt.div_ceil(job_rows);
            // Few row runs (small chunk): split the panels too.
            let panel_parts = (8usize.div_ceil(XI * row_jobs)).clamp(1, panels);
            let panel_run = panels.div_ceil(panel_parts);
            let panel_jobs = panels.div_ceil(panel_run);
            let mp = SendPtr(mm.as_mut_ptr());
            let v = &*v;
            (0..XI * row_jobs * panel_jobs)
                .into_par_iter()
                .for_each_init(GemmScratch::default, |scratch, job| {
                    let (xi, rest) = (job / (row_jobs * panel_jobs), job % (row_jobs * panel_jobs));
                    let (rj, pj) = (rest / panel_jobs, rest % panel_jobs);
                    let r0 = rj * job_rows;
                    let rows = job_rows.min(nt - r0);
                    let a = &v[(xi * chunk + r0) * cin..(xi * chunk + r0 + rows) * cin];
                    let p0 = pj * panel_run;
                    let p1 = (p0 + panel_run).min(panels);
                    // SAFETY: this job alone writes rows r0..r0+rows, panels
                    // p0..p1 of M[xi].
                    unsafe {
                        let o = mp.get().add((xi * chunk + r0) * cout);
                        #[cfg(target_arch = "x86_64")]
                        if packed {
                            let a = &v[(xi * chunk + r0) * cin..(xi * chunk + r0 + rows.div_ceil(g.mr) * g.mr) * cin];
                            // U comes from memory here: its next chunk is prefetched
                            // on AVX2 (see `gemm_packed_a`).
                            gemm_packed_a(a, rows, &kernel.u[xi], p0..p1, o, cout, scratch, isa == Isa::Avx2);
                            return;
                        }
                        gemm_packed(a, cin, rows, &kernel.u[xi], p0..p1, o, cout, scratch);
                    }
                });
        }
        // 3. Output transform + bias + ReLU into `out`.
        {
            let mm = &*mm;
            (0..nt.div_ceil(16)).into_par_iter().for_each(|b| {
                for t in b * 16..((b + 1) * 16).min(nt) {
                    // SAFETY: tile t0+t writes its own output pixels only.
                    unsafe { output_tile(isa, mm, geom, cout, t, chunk, t0 + t, bias, relu, pool, out_ptr.get()) };
                }
            });
        }
    }
}

/// Lanes of channels the transforms work on together: a SIMD vector for
/// AVX2 (8 channels), one f32 for the portable code and channel tails. The
/// transforms are written once over this trait.
trait Lanes: Copy {
    const W: usize;
    fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// Stores the lanes as groups of 8 channels, group g at `p + g *
    /// group_stride` (Winograd's packed V keeps 8-channel groups apart; 8
    /// when they are contiguous). At most 8 lanes: one plain store.
    #[inline(always)]
    unsafe fn store_groups(self, p: *mut f32, group_stride: usize) {
        let _ = group_stride;
        self.store(p)
    }
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn scale(self, c: f32) -> Self;
    /// max(self, 0), 0 for NaN as f32::max.
    fn relu(self) -> Self;
    /// `if u > self { u } else { self }` per lane: `maxpool2x2`'s step
    /// (so NaN handling and signed zeros match it bit for bit).
    fn pool_max(self, u: Self) -> Self;
}

impl Lanes for f32 {
    const W: usize = 1;
    fn zero() -> f32 {
        0.0
    }
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    unsafe fn store(self, p: *mut f32) {
        *p = self
    }
    fn add(self, o: f32) -> f32 {
        self + o
    }
    fn sub(self, o: f32) -> f32 {
        self - o
    }
    fn scale(self, c: f32) -> f32 {
        self * c
    }
    fn relu(self) -> f32 {
        self.max(0.0)
    }
    fn pool_max(self, u: f32) -> f32 {
        if u > self {
            u
        } else {
            self
        }
    }
}

/// A SIMD vector type implementing [`Lanes`] with the given intrinsics
/// (only reached from functions compiled with their target feature);
/// `extra` adds or overrides methods.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_lanes {
    ($(#[$doc:meta])* $name:ident($vec:ident), $w:literal, $setzero:ident, $loadu:ident, $storeu:ident,
     $add:ident, $sub:ident, $mul:ident, $set1:ident, $max:ident $(, { $($extra:tt)* })?) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        struct $name(std::arch::x86_64::$vec);

        impl Lanes for $name {
            const W: usize = $w;
            #[inline(always)]
            fn zero() -> $name {
                // SAFETY: only reached from functions with the feature.
                $name(unsafe { std::arch::x86_64::$setzero() })
            }
            #[inline(always)]
            unsafe fn load(p: *const f32) -> $name {
                $name(std::arch::x86_64::$loadu(p))
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                std::arch::x86_64::$storeu(p, self.0)
            }
            #[inline(always)]
            fn add(self, o: $name) -> $name {
                $name(unsafe { std::arch::x86_64::$add(self.0, o.0) })
            }
            #[inline(always)]
            fn sub(self, o: $name) -> $name {
                $name(unsafe { std::arch::x86_64::$sub(self.0, o.0) })
            }
            #[inline(always)]
            fn scale(self, c: f32) -> $name {
                use std::arch::x86_64::*;
                $name(unsafe { $mul(self.0, $set1(c)) })
            }
            #[inline(always)]
            fn relu(self) -> $name {
                use std::arch::x86_64::*;
                // max(v, 0) with 0 second returns 0 for NaN.
                $name(unsafe { $max(self.0, $setzero()) })
            }
            #[inline(always)]
            fn pool_max(self, u: $name) -> $name {
                // max(u, v) returns u where u > v, else v (NaN included).
                $name(unsafe { std::arch::x86_64::$max(u.0, self.0) })
            }
            $($($extra)*)?
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_lanes!(
    /// 8 channels (AVX2).
    Ymm(__m256), 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps,
    _mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_max_ps
);

#[cfg(target_arch = "x86_64")]
simd_lanes!(
    /// 16 channels (AVX-512F): the same operations as [`Ymm`] on twice the
    /// lanes, so the same results.
    Zmm(__m512), 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps,
    _mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps, _mm512_set1_ps, _mm512_max_ps,
    {
        #[inline(always)]
        unsafe fn store_groups(self, p: *mut f32, group_stride: usize) {
            use std::arch::x86_64::*;
            if group_stride == 8 {
                _mm512_storeu_ps(p, self.0)
            } else {
                _mm256_storeu_ps(p, _mm512_castps512_ps256(self.0));
                _mm256_storeu_ps(
                    p.add(group_stride),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0))),
                );
            }
        }
    }
);

/// B^T (6x6) applied to six vectors d0..d5:
/// ```text
/// B^T = [ 4  0 -5  0  1  0 ]
///       [ 0 -4 -4  1  1  0 ]
///       [ 0  4 -4 -1  1  0 ]
///       [ 0 -2 -1  2  1  0 ]
///       [ 0  2 -1 -2  1  0 ]
///       [ 0  4  0 -5  0  1 ]
/// ```
#[inline(always)]
fn bt<L: Lanes>(d: [L; T]) -> [L; T] {
    let [d0, d1, d2, d3, d4, d5] = d;
    let (s12, d12) = (d1.add(d2), d1.sub(d2));
    let (s34, d34) = (d3.add(d4), d4.sub(d3));
    let (d42, d31) = (d4.sub(d2), d3.sub(d1));
    [
        d0.scale(4.0).sub(d2.scale(5.0)).add(d4),
        s34.sub(s12.scale(4.0)),
        d12.scale(4.0).add(d34),
        d31.scale(2.0).add(d42),
        d42.sub(d31.scale(2.0)),
        d1.scale(4.0).sub(d3.scale(5.0)).add(d5),
    ]
}

/// A^T (4x6) applied to six vectors m0..m5:
/// ```text
/// A^T = [ 1  1  1  1  1  0 ]
///       [ 0  1 -1  2 -2  0 ]
///       [ 0  1  1  4  4  0 ]
///       [ 0  1 -1  8 -8  1 ]
/// ```
#[inline(always)]
fn at<L: Lanes>(m: [L; T]) -> [L; M] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (s12, d12, s34, d34) = (m1.add(m2), m1.sub(m2), m3.add(m4), m3.sub(m4));
    [
        m0.add(s12).add(s34),
        d12.add(d34.scale(2.0)),
        s12.add(s34.scale(4.0)),
        d12.add(d34.scale(8.0)).add(m5),
    ]
}

/// Where tile `tile` sits: (image, first row, first column) of its 4x4
/// outputs.
fn tile_origin(tile: usize, ty: usize, tx: usize) -> (usize, usize, usize) {
    let (img, rem) = (tile / (ty * tx), tile % (ty * tx));
    (img, rem / tx * M, rem % tx * M)
}

/// V[xi][t][c0..c0+W] = B^T d B for channels c0.. of one tile; `src` holds
/// the 36 input offsets (None off the image).
// Columns of row-major temporaries: the loops index across rows.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn input_lanes<L: Lanes>(
    x: *const f32,
    src: &[Option<usize>; XI],
    c0: usize,
    dst: *mut f32,
    (stride, cmul): (usize, usize),
) {
    // Rows: e[r][c] = (d B)[r][c] = sum_k B^T[c][k] d[r][k]. Built row by
    // row in place, never zero-filled first (as a zeroed array then filled
    // it was a 1152-byte memset call per 8 channels per tile: 7% of the 224
    // px pass), and with no `array::from_fn` closures: those are functions
    // of their own without the caller's target features, and left out of
    // line they made every intrinsic in them a call (the AVX2 pass spent a
    // third of its time in `_mm256_add_ps` and friends).
    let mut rows = std::mem::MaybeUninit::<[[L; T]; T]>::uninit();
    let rp = rows.as_mut_ptr().cast::<[L; T]>();
    for r in 0..T {
        let s = &src[r * T..r * T + T];
        let d = |k: usize| load_or_zero::<L>(x, s[k], c0);
        rp.add(r).write(bt([d(0), d(1), d(2), d(3), d(4), d(5)]));
    }
    // SAFETY: all T rows were written just above.
    let e = rows.assume_init_ref();
    // Columns: V[r][c] = sum_k B^T[r][k] e[k][c].
    for c in 0..T {
        let o = bt([e[0][c], e[1][c], e[2][c], e[3][c], e[4][c], e[5][c]]);
        for (r, v) in o.into_iter().enumerate() {
            v.store_groups(dst.add((r * T + c) * stride + c0 * cmul), 8 * cmul);
        }
    }
}

/// `x[s + c0..]` as lanes, zeros where the offset is None (off the image).
#[inline(always)]
unsafe fn load_or_zero<L: Lanes>(x: *const f32, s: Option<usize>, c0: usize) -> L {
    match s {
        Some(s) => L::load(x.add(s + c0)),
        None => L::zero(),
    }
}

/// V[.][t][..] for one tile, all channels.
///
/// # Safety
/// `v` points at a (XI, chunk, cin) buffer; row t of every xi is this
/// call's alone.
#[allow(clippy::too_many_arguments)]
unsafe fn input_tile(
    isa: Isa,
    x: &[f32],
    geom: (usize, usize, usize, usize, usize),
    cin: usize,
    tile: usize,
    v: *mut f32,
    t: usize,
    chunk: usize,
    packed: bool,
) {
    let (_n, h, w, ty, tx) = geom;
    let (img, oy, ox) = tile_origin(tile, ty, tx);
    // Each entry written once (an array set to None first and then filled
    // was a call to memset per tile: 5.5% of the whole 224 px pass).
    let src: [Option<usize>; XI] = std::array::from_fn(|i| {
        let (iy, ix) = ((oy + i / T) as isize - 1, (ox + i % T) as isize - 1);
        (iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w)
            .then(|| ((img * h + iy as usize) * w + ix as usize) * cin)
    });
    // Row t of each V[xi]; packed: block t/mr, lane row t%mr of each
    // 8-channel group (channel c at c*mr + lane row * 8 + c%8), mr the
    // ISA's micro-kernel rows (6 on AVX2, 12 on AVX-512).
    let (dst, cmul) = if packed {
        let mr = Geometry::of(isa).mr;
        (v.add((t / mr) * mr * cin + (t % mr) * 8), mr)
    } else {
        (v.add(t * cin), 1)
    };
    let layout = (chunk * cin, cmul);
    // Whole vectors on x86 with AVX2, then single channels.
    #[cfg(target_arch = "x86_64")]
    let c0 = match isa {
        Isa::Avx512 => input_avx512(x.as_ptr(), &src, cin, dst, layout),
        Isa::Avx2 => input_avx2(x.as_ptr(), &src, cin, dst, layout),
        Isa::Generic => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let c0 = {
        let _ = isa;
        0
    };
    debug_assert!(!packed || c0 == cin, "packed V needs whole 8-channel groups");
    for c in (c0..cin).step_by(f32::W) {
        input_lanes::<f32>(x.as_ptr(), &src, c, dst, layout);
    }
}

/// The whole 8-channel groups of [`input_tile`]; returns the channels done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_avx2(
    x: *const f32,
    src: &[Option<usize>; XI],
    cin: usize,
    dst: *mut f32,
    layout: (usize, usize),
) -> usize {
    let mut c0 = 0;
    while c0 + Ymm::W <= cin {
        input_lanes::<Ymm>(x, src, c0, dst, layout);
        c0 += Ymm::W;
    }
    c0
}

/// [`input_avx2`] for AVX-512F: 16 channels at a time, then 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_avx512(
    x: *const f32,
    src: &[Option<usize>; XI],
    cin: usize,
    dst: *mut f32,
    layout: (usize, usize),
) -> usize {
    let mut c0 = 0;
    while c0 + Zmm::W <= cin {
        input_lanes::<Zmm>(x, src, c0, dst, layout);
        c0 += Zmm::W;
    }
    while c0 + Ymm::W <= cin {
        input_lanes::<Ymm>(x, src, c0, dst, layout);
        c0 += Ymm::W;
    }
    c0
}

/// Y = A^T M A + bias, ReLU, for channels c0.. of one tile: `m` points at
/// M[0][t][0] (position stride `stride`), `out` at the tile's first output
/// pixel (row stride `ldo` pixels of `cout`), `rows` x `cols` kept. With
/// `pool` (rows and cols even), each 2x2 of those pixels max-pooled in
/// `maxpool2x2`'s order into one pixel: `out` and `ldo` are then the
/// pooled image's.
#[allow(clippy::too_many_arguments)]
// Columns of row-major temporaries: the loops index across rows.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn output_lanes<L: Lanes>(
    m: *const f32,
    stride: usize,
    c0: usize,
    bias: *const f32,
    relu: bool,
    out: *mut f32,
    (cout, ldo, rows, cols): (usize, usize, usize, usize),
    pool: bool,
) {
    // Rows: e[r][c] = sum_k A^T[r][k] m[k][c], r < 4. Column by column
    // (e[c][r] here), in place, no `array::from_fn` (see input_lanes).
    let mut cols_e = std::mem::MaybeUninit::<[[L; M]; T]>::uninit();
    let ep = cols_e.as_mut_ptr().cast::<[L; M]>();
    for c in 0..T {
        let mk = |k: usize| L::load(m.add((k * T + c) * stride + c0));
        ep.add(c).write(at::<L>([mk(0), mk(1), mk(2), mk(3), mk(4), mk(5)]));
    }
    // SAFETY: all T columns were written just above.
    let e = cols_e.assume_init_ref();
    // Columns: Y[r][c] = sum_k A^T[c][k] e[r][k].
    let b = L::load(bias.add(c0));
    if pool {
        // rows, cols even; `out` and `ldo` are the pooled image's.
        for r in (0..rows).step_by(2) {
            let (top, bottom) = (out_row(e, r, b, relu), out_row(e, r + 1, b, relu));
            for c in (0..cols).step_by(2) {
                let v = top[c].pool_max(top[c + 1]).pool_max(bottom[c]).pool_max(bottom[c + 1]);
                v.store(out.add((r / 2 * ldo + c / 2) * cout + c0));
            }
        }
        return;
    }
    for r in 0..rows {
        for (c, v) in out_row(e, r, b, relu).into_iter().enumerate().take(cols) {
            v.store(out.add((r * ldo + c) * cout + c0));
        }
    }
}

/// Row `r` of Y = A^T M A (columns: A^T applied to `e`'s row r), plus the
/// bias `b`, ReLU when `relu`. A function, not a closure: closures do not
/// take their caller's target features, so the intrinsics inside would be
/// calls.
#[inline(always)]
fn out_row<L: Lanes>(e: &[[L; M]; T], r: usize, b: L, relu: bool) -> [L; M] {
    let mut y = at::<L>([e[0][r], e[1][r], e[2][r], e[3][r], e[4][r], e[5][r]]);
    for v in y.iter_mut() {
        *v = v.add(b);
        if relu {
            *v = v.relu();
        }
    }
    y
}

/// Y = A^T M A for tile `t` of the chunk (global index `tile`), plus bias,
/// ReLU, into the output pixels inside the image; with `pool`, each 2x2
/// of those pixels max-pooled into one pixel of the (N*H/2*W/2, Cout)
/// output instead.
///
/// # Safety
/// `out` points at the (N*H*W, Cout) output (pooled: (N*H/2*W/2, Cout), H
/// and W even); tile `tile`'s pixels are this call's alone.
#[allow(clippy::too_many_arguments)]
unsafe fn output_tile(
    isa: Isa,
    mm: &[f32],
    geom: (usize, usize, usize, usize, usize),
    cout: usize,
    t: usize,
    chunk: usize,
    tile: usize,
    bias: &[f32],
    relu: bool,
    pool: bool,
    out: *mut f32,
) {
    let (_n, h, w, ty, tx) = geom;
    let (img, oy, ox) = tile_origin(tile, ty, tx);
    let m = mm.as_ptr().add(t * cout);
    // Pooled, the output image is (h/2, w/2) and the tile starts at
    // (oy/2, ox/2): tile origins are multiples of 4, and h, w even.
    let f = if pool { 2 } else { 1 };
    let (oh, ow) = (h / f, w / f);
    let o = out.add(((img * oh + oy / f) * ow + ox / f) * cout);
    let dims = (cout, ow, M.min(h - oy), M.min(w - ox));
    let stride = chunk * cout;
    // Whole vectors on x86 with AVX2, then single channels.
    #[cfg(target_arch = "x86_64")]
    let c0 = match isa {
        Isa::Avx512 => output_avx512(m, stride, bias.as_ptr(), relu, o, dims, pool),
        Isa::Avx2 => output_avx2(m, stride, bias.as_ptr(), relu, o, dims, pool),
        Isa::Generic => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let c0 = {
        let _ = isa;
        0
    };
    for c in (c0..cout).step_by(f32::W) {
        output_lanes::<f32>(m, stride, c, bias.as_ptr(), relu, o, dims, pool);
    }
}

/// The whole 8-channel groups of [`output_tile`]; returns the channels done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_avx2(
    m: *const f32,
    stride: usize,
    bias: *const f32,
    relu: bool,
    out: *mut f32,
    dims: (usize, usize, usize, usize),
    pool: bool,
) -> usize {
    let mut c0 = 0;
    while c0 + Ymm::W <= dims.0 {
        output_lanes::<Ymm>(m, stride, c0, bias, relu, out, dims, pool);
        c0 += Ymm::W;
    }
    c0
}

/// [`output_avx2`] for AVX-512F: 16 channels at a time, then 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_avx512(
    m: *const f32,
    stride: usize,
    bias: *const f32,
    relu: bool,
    out: *mut f32,
    dims: (usize, usize, usize, usize),
    pool: bool,
) -> usize {
    let mut c0 = 0;
    while c0 + Zmm::W <= dims.0 {
        output_lanes::<Zmm>(m, stride, c0, bias, relu, out, dims, pool);
        c0 += Zmm::W;
    }
    while c0 + Ymm::W <= dims.0 {
        output_lanes::<Ymm>(m, stride, c0, bias, relu, out, dims, pool);
        c0 += Ymm::W;
    }
    c0
}

/// A (6x4) applied to four vectors y0..y3 (the transpose of A^T above):
/// rows (1 0 0 0), (1 1 1 1), (1 -1 1 -1), (1 2 4 8), (1 -2 4 -8), (0 0 0 1).
#[inline(always)]
fn a6<L: Lanes>(y: [L; M]) -> [L; T] {
    let [y0, y1, y2, y3] = y;
    let (s02, s13) = (y0.add(y2), y1.add(y3));
    let (q02, q13) = (y0.add(y2.scale(4.0)), y1.scale(2.0).add(y3.scale(8.0)));
    [y0, s02.add(s13), s02.sub(s13), q02.add(q13), q02.sub(q13), y3]
}

/// dM[xi][t][c0..c0+W] = (A dY A^T)[xi] for channels c0.. of one tile of
/// the output gradient; `src` holds the 16 pixel offsets (None off the
/// image: zero gradient there).
// Columns of row-major temporaries: the loops index across rows.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn grad_lanes<L: Lanes>(dz: *const f32, src: &[Option<usize>; M * M], c0: usize, dst: *mut f32, stride: usize) {
    // Rows: e[r][j] = sum_c dY[r][c] A[j][c], r < 4.
    // Built in place, never zero-filled first (see input_lanes).
    let mut rows = std::mem::MaybeUninit::<[[L; T]; M]>::uninit();
    let rp = rows.as_mut_ptr().cast::<[L; T]>();
    for r in 0..M {
        let s = &src[r * M..r * M + M];
        let d = |c: usize| load_or_zero::<L>(dz, s[c], c0);
        rp.add(r).write(a6([d(0), d(1), d(2), d(3)]));
    }
    // SAFETY: all M rows were written just above.
    let e = rows.assume_init_ref();
    // Columns: dM[i][j] = sum_r A[i][r] e[r][j].
    for j in 0..T {
        let o = a6::<L>([e[0][j], e[1][j], e[2][j], e[3][j]]);
        for (i, v) in o.into_iter().enumerate() {
            v.store(dst.add((i * T + j) * stride + c0));
        }
    }
}

/// dM[.][t][..] for tile `tile` (global index) of the output gradient `dz`
/// (N*H*W, Cout), all channels.
///
/// # Safety
/// `dm` points at a (XI, chunk, cout) buffer; row t of every xi is this
/// call's alone.
#[allow(clippy::too_many_arguments)]
unsafe fn grad_tile(
    isa: Isa,
    dz: &[f32],
    (_n, h, w, ty, tx): (usize, usize, usize, usize, usize),
    cout: usize,
    tile: usize,
    dm: *mut f32,
    t: usize,
    chunk: usize,
) {
    let (img, oy, ox) = tile_origin(tile, ty, tx);
    // Each entry written once (see input_tile).
    let src: [Option<usize>; M * M] = std::array::from_fn(|i| {
        let (r, c) = (i / M, i % M);
        (oy + r < h && ox + c < w).then(|| ((img * h + oy + r) * w + ox + c) * cout)
    });
    let dst = dm.add(t * cout);
    let stride = chunk * cout;
    // Whole vectors on x86 with AVX2, then single channels.
    #[cfg(target_arch = "x86_64")]
    let c0 = match isa {
        Isa::Avx512 => grad_avx512(dz.as_ptr(), &src, cout, dst, stride),
        Isa::Avx2 => grad_avx2(dz.as_ptr(), &src, cout, dst, stride),
        Isa::Generic => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let c0 = {
        let _ = isa;
        0
    };
    for c in (c0..cout).step_by(f32::W) {
        grad_lanes::<f32>(dz.as_ptr(), &src, c, dst, stride);
    }
}

/// The whole 8-channel groups of [`grad_tile`]; returns the channels done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_avx2(dz: *const f32, src: &[Option<usize>; M * M], cout: usize, dst: *mut f32, stride: usize) -> usize {
    let mut c0 = 0;
    while c0 + Ymm::W <= cout {
        grad_lanes::<Ymm>(dz, src, c0, dst, stride);
        c0 += Ymm::W;
    }
    c0
}

/// [`grad_avx2`] for AVX-512F: 16 channels at a time, then 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn grad_avx512(
    dz: *const f32,
    src: &[Option<usize>; M * M],
    cout: usize,
    dst: *mut f32,
    stride: usize,
) -> usize {
    let mut c0 = 0;
    while c0 + Zmm::W <= cout {
        grad_lanes::<Zmm>(dz, src, c0, dst, stride);
        c0 += Zmm::W;
    }
    while c0 + Ymm::W <= cout {
        grad_lanes::<Ymm>(dz, src, c0, dst, stride);
        c0 += Ymm::W;
    }
    c0
}

/// The weight gradient of a 3x3 "same" conv by F(4x4, 3x3): `x` (N, H, W,
/// Cin) and `dz` (N, H, W, Cout) (the gradient at the pre-activation output)
/// as flat NHWC slices; returns dW as (9*Cin, Cout), Keras order
/// ((ky*3 + kx)*Cin + ci, co). The transforms run on `isa`, the 36 GEMMs
/// on the `gemm` crate (one per job, jobs over xi).
///
/// ```text
/// dU[xi] (Cin, Cout) += V[xi]^T (Cin, tiles) x dM[xi] (tiles, Cout)   per chunk, in order
/// dW[a][b] = sum_{i,j} G[i][a] dU[(i,j)] G[j][b]
/// ```
pub fn conv3x3_winograd_dw(
    isa: Isa,
    x: &[f32],
    (n, h, w, cin): (usize, usize, usize, usize),
    dz: &[f32],
    cout: usize,
) -> Vec<f32> {
    use super::gemm::{sgemm_serial, Backend};
    use ndarray::ArrayView2;
    assert!(
        isa.supported(),
        "conv3x3_winograd_dw: this CPU cannot run the {} transforms",
        isa.name()
    );
    assert_eq!(x.len(), n * h * w * cin, "conv3x3_winograd_dw: x is not (n, h, w, cin)");
    assert_eq!(
        dz.len(),
        n * h * w * cout,
        "conv3x3_winograd_dw: dz is not (n, h, w, cout)"
    );
    let mut dw = vec![0.0f32; 9 * cin * cout];
    if n * h * w == 0 || cin == 0 || cout == 0 {
        return dw;
    }
    let (ty, tx) = (h.div_ceil(M), w.div_ceil(M));
    let tiles = n * ty * tx;
    let chunk = chunk_tiles(tiles, cin, cout, 1);
    let geom = (n, h, w, ty, tx);
    // dU (36 MB for a 512 x 512 layer) is kept by the calling thread across
    // calls: a fresh one is fresh pages from the OS every step, which the
    // kernel zeroes (a tenth of a small stage-2 step). The first chunk's
    // GEMMs overwrite it, so stale values are never read.
    // V and dM as in the forward ([`Scratch`]): every row a chunk's GEMMs
    // read was written by its transforms.
    let mut scratch = Scratch::take(XI * chunk * cin, XI * chunk * cout);
    let (v, dm) = scratch.parts();
    DW_SCRATCH.with_borrow_mut(|du| {
        du.resize(XI * cin * cout, 0.0);
        for (ci, t0) in (0..tiles).step_by(chunk).enumerate() {
            let nt = chunk.min(tiles - t0);
            {
                let (vp, mp) = (SendPtr(v.as_mut_ptr()), SendPtr(dm.as_mut_ptr()));
                (0..nt.div_ceil(16)).into_par_iter().for_each(|b| {
                    for t in b * 16..((b + 1) * 16).min(nt) {
                        // SAFETY: tile t writes row t of V and of dM only.
                        unsafe {
                            input_tile(isa, x, geom, cin, t0 + t, vp.get(), t, chunk, false);
                            grad_tile(isa, dz, geom, cout, t0 + t, mp.get(), t, chunk);
                        }
                    }
                });
            }
            let (v, dm) = (&v, &dm);
            du[..XI * cin * cout]
                .par_chunks_mut(cin * cout)
                .enumerate()
                .for_each(|(xi, d)| {
                    let a = ArrayView2::from_shape((nt, cin), &v[xi * chunk * cin..(xi * chunk + nt) * cin])
                        .expect("sized");
                    let b = ArrayView2::from_shape((nt, cout), &dm[xi * chunk * cout..(xi * chunk + nt) * cout])
                        .expect("sized");
                    let c = ndarray::ArrayViewMut2::from_shape((cin, cout), d).expect("sized");
                    // (Cin, Cout) (+)= (Cin, nt) x (nt, Cout)
                    sgemm_serial(Backend::auto(), a.t(), b, c, ci > 0);
                });
        }
        dw_output_transform(isa, &du[..XI * cin * cout], cin, cout, &mut dw);
    });
    dw
}

thread_local! {
    /// dU of [`conv3x3_winograd_dw`], kept by each calling thread.
    static DW_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// V and M of the forward and of dW ([`Scratch`]).
    static VM_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The calling thread's V and M buffers, taken for one call and given
/// back on drop, grown as needed (at most [`CHUNK_BYTES`] together, bar
/// tiny chunks): fresh ones were zeroed on every call, five times a
/// stage-2 step, on one thread while the others waited. They hold the last
/// call's values: callers write before they read.
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    lens: (usize, usize),
}

impl Scratch {
    fn take(v_len: usize, m_len: usize) -> Scratch {
        let (mut v, mut m) = VM_SCRATCH.with_borrow_mut(std::mem::take);
        if v.len() < v_len {
            v.resize(v_len, 0.0);
        }
        if m.len() < m_len {
            m.resize(m_len, 0.0);
        }
        Scratch {
            v,
            m,
            lens: (v_len, m_len),
        }
    }

    /// V and M, of the lengths asked for.
    fn parts(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.v[..self.lens.0], &mut self.m[..self.lens.1])
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let bufs = (std::mem::take(&mut self.v), std::mem::take(&mut self.m));
        VM_SCRATCH.with_borrow_mut(|s| *s = bufs);
    }
}

/// dW[a][b] = sum_{i,j} G[i][a] dU[(i,j)] G[j][b] for every input channel
/// and output channel: `du` is (36, Cin, Cout), `dw` (9*Cin, Cout) in Keras
/// order. Separable and in f64: first over i (a 3 x 6 block of rows), then
/// over j, each term in fixed order. One job per input channel reads its 36
/// rows of dU once (they stay in L2) and writes its 9 rows of dW.
fn dw_output_transform(isa: Isa, du: &[f32], cin: usize, cout: usize, dw: &mut [f32]) {
    let out = SendPtr(dw.as_mut_ptr());
    (0..cin).into_par_iter().for_each_init(
        || vec![0.0f64; (3 * T + 1) * cout],
        |scratch, ci| {
            // SAFETY: channel ci writes rows tap*cin + ci of dW only.
            let rows: [&mut [f32]; 9] = std::array::from_fn(|tap| unsafe {
                std::slice::from_raw_parts_mut(out.get().add((tap * cin + ci) * cout), cout)
            });
            let src: [&[f32]; XI] = std::array::from_fn(|xi| &du[(xi * cin + ci) * cout..(xi * cin + ci + 1) * cout]);
            // SAFETY: the dispatch only names ISAs this CPU runs, and
            // AVX2 is the least of them on x86.
            #[cfg(target_arch = "x86_64")]
            match isa {
                Isa::Avx512 => return unsafe { dw_channel_avx512(&src, scratch, rows) },
                Isa::Avx2 => return unsafe { dw_channel_avx2(&src, scratch, rows) },
                Isa::Generic => {}
            }
            let _ = isa;
            dw_channel(&src, scratch, rows);
        },
    );
}

/// [`dw_channel`] compiled for AVX-512 (8 doubles a vector; the same
/// operations in the same order, so the same results).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dw_channel_avx512(du: &[&[f32]; XI], scratch: &mut [f64], dw: [&mut [f32]; 9]) {
    dw_channel(du, scratch, dw)
}

/// [`dw_channel`] compiled for AVX2 (4 doubles a vector; the same
/// operations in the same order, so the same results).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dw_channel_avx2(du: &[&[f32]; XI], scratch: &mut [f64], dw: [&mut [f32]; 9]) {
    dw_channel(du, scratch, dw)
}

/// One input channel of [`dw_output_transform`]: `du` its 36 rows, `dw` its
/// 9 rows (tap order), `scratch` 19 rows of f64.
#[inline(always)]
fn dw_channel(du: &[&[f32]; XI], scratch: &mut [f64], dw: [&mut [f32]; 9]) {
    let cout = dw[0].len();
    let (part, acc) = scratch.split_at_mut(3 * T * cout);
    // part[a][j] = sum_i G[i][a] dU[(i, j)]
    for a in 0..3 {
        for j in 0..T {
            let p = &mut part[(a * T + j) * cout..(a * T + j + 1) * cout];
            p.fill(0.0);
            for (i, g) in G.iter().enumerate() {
                let c = g[a];
                if c != 0.0 {
                    p.iter_mut().zip(du[i * T + j]).for_each(|(s, &u)| *s += c * u as f64);
                }
            }
        }
    }
    // dW[a][b] = sum_j G[j][b] part[a][j]
    let acc = &mut acc[..cout];
    for (tap, row) in dw.into_iter().enumerate() {
        let (a, b) = (tap / 3, tap % 3);
        acc.fill(0.0);
        for (j, g) in G.iter().enumerate() {
            let c = g[b];
            if c != 0.0 {
                let p = &part[(a * T + j) * cout..(a * T + j + 1) * cout];
                acc.iter_mut().zip(p).for_each(|(s, &q)| *s += c * q);
            }
        }
        row.iter_mut().zip(&*acc).for_each(|(o, &s)| *o = s as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 36 packed matrices of a `cin` x `cout` kernel filled by `rows`.
    fn transform_with(rows: RowsFn, nr: usize, ws: &[f32], cin: usize, cout: usize) -> Vec<Vec<f32>> {
        let mut u: Vec<Vec<f32>> = (0..XI).map(|_| vec![f32::NAN; cout.div_ceil(nr) * cin * nr]).collect();
        let dst: Vec<SendPtr> = u.iter_mut().map(|m| SendPtr(m.as_mut_ptr())).collect();
        let dst: &[SendPtr; XI] = dst.as_slice().try_into().expect("36 matrices");
        for b in (0..cin).step_by(FLIP_ROWS) {
            // SAFETY: every matrix holds cout.div_ceil(nr) panels of cin rows.
            unsafe { rows(ws, cin, cout, b..(b + FLIP_ROWS).min(cin), dst) };
        }
        u
    }

    fn bits(v: &[Vec<f32>]) -> Vec<u32> {
        v.iter().flatten().map(|x| x.to_bits()).collect()
    }

    /// The kernel transform compiled for AVX-512, for AVX2 and portably
    /// gives the same floats bit for bit (plain and flipped, both panel
    /// widths, channel counts that leave partial panels and jobs).
    #[test]
    fn kernel_transform_builds_agree() {
        let (cin, cout) = (37, 45);
        let ws: Vec<f32> = (0..9 * cin * cout)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        type Pair = (usize, RowsFn, RowsFn);
        let portable: [Pair; 2] = [
            (16, transform_rows::<16, false>, transform_rows::<16, true>),
            (32, transform_rows::<32, false>, transform_rows::<32, true>),
        ];
        for (nr, plain, flipped) in portable {
            let want = [
                bits(&transform_with(plain, nr, &ws, cin, cout)),
                bits(&transform_with(flipped, nr, &ws, cin, cout)),
            ];
            assert!(
                want[0].iter().all(|&b| !f32::from_bits(b).is_nan()),
                "every float written"
            );
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let got = [
                    bits(&transform_with(rows_fn(isa, nr, false), nr, &ws, cin, cout)),
                    bits(&transform_with(rows_fn(isa, nr, true), nr, &ws, cin, cout)),
                ];
                assert_eq!(got[0], want[0], "plain, {} nr {nr}", isa.name());
                assert_eq!(got[1], want[1], "flipped, {} nr {nr}", isa.name());
            }
        }
    }

    /// dW's output transform gives the same floats on every ISA.
    #[test]
    fn dw_output_transform_builds_agree() {
        let (cin, cout) = (5, 43);
        let du: Vec<f32> = (0..XI * cin * cout)
            .map(|i| ((i * 6101) % 977) as f32 / 89.0 - 5.0)
            .collect();
        let mut want = vec![f32::NAN; 9 * cin * cout];
        dw_output_transform(Isa::Generic, &du, cin, cout, &mut want);
        assert!(want.iter().all(|v| !v.is_nan()), "every float written");
        for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
            let mut got = vec![f32::NAN; 9 * cin * cout];
            dw_output_transform(isa, &du, cin, cout, &mut got);
            let b = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(b(&got), b(&want), "{}", isa.name());
        }
    }

    /// The input transform (plain and packed V), the output transform and
    /// the output gradient's transform give the same floats on every ISA: AVX-512's 16-lane build, AVX2's
    /// 8-lane one and the portable one (channel counts that leave a 16-,
    /// an 8- and a 1-lane tail; tiles cut by the image's edge).
    #[test]
    fn input_and_output_transform_builds_agree() {
        let (n, h, w): (usize, usize, usize) = (4, 7, 9);
        let (ty, tx) = (h.div_ceil(M), w.div_ceil(M));
        let geom = (n, h, w, ty, tx);
        let chunk = n * ty * tx; // 24: whole micro-panels of 6 and of 12
        let val = |i: usize| ((i * 7919) % 1013) as f32 / 97.0 - 5.0;
        let bitv = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // V[xi][t][c] as plain rows, whatever layout `isa` wrote.
        let input = |isa: Isa, cin: usize, packed: bool| -> Vec<f32> {
            let x: Vec<f32> = (0..n * h * w * cin).map(val).collect();
            let mut v = vec![f32::NAN; XI * chunk * cin];
            for t in 0..chunk {
                // SAFETY: v is (XI, chunk, cin); tile t writes row t only.
                unsafe { input_tile(isa, &x, geom, cin, t, v.as_mut_ptr(), t, chunk, packed) };
            }
            let mr = Geometry::of(isa).mr;
            let at = |xi: usize, t: usize, c: usize| match packed {
                false => xi * chunk * cin + t * cin + c,
                true => xi * chunk * cin + (t / mr) * mr * cin + (t % mr) * 8 + (c / 8) * 8 * mr + c % 8,
            };
            let mut plain = Vec::with_capacity(v.len());
            for xi in 0..XI {
                for t in 0..chunk {
                    plain.extend((0..cin).map(|c| v[at(xi, t, c)]));
                }
            }
            plain
        };
        let output = |isa: Isa, cout: usize| -> Vec<f32> {
            let mm: Vec<f32> = (0..XI * chunk * cout).map(val).collect();
            let bias: Vec<f32> = (0..cout).map(|i| val(3 * i + 1)).collect();
            let mut out = vec![f32::NAN; n * h * w * cout];
            for t in 0..chunk {
                // SAFETY: mm is (XI, chunk, cout); out (n*h*w, cout), tile
                // t's pixels written by this call alone.
                unsafe { output_tile(isa, &mm, geom, cout, t, chunk, t, &bias, true, false, out.as_mut_ptr()) };
            }
            out
        };
        let grad = |isa: Isa, cout: usize| -> Vec<f32> {
            let dz: Vec<f32> = (0..n * h * w * cout).map(val).collect();
            let mut dm = vec![f32::NAN; XI * chunk * cout];
            for t in 0..chunk {
                // SAFETY: dm is (XI, chunk, cout); tile t writes row t only.
                unsafe { grad_tile(isa, &dz, geom, cout, t, dm.as_mut_ptr(), t, chunk) };
            }
            dm
        };
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported()).collect();
        for cin in [45, 16, 3] {
            let want = input(Isa::Generic, cin, false);
            assert!(want.iter().all(|v| !v.is_nan()), "every float written");
            for &isa in &isas {
                assert_eq!(
                    bitv(&input(isa, cin, false)),
                    bitv(&want),
                    "input, {} cin {cin}",
                    isa.name()
                );
            }
            let dm = grad(Isa::Generic, cin);
            assert!(dm.iter().all(|v| !v.is_nan()), "every dM float written");
            for &isa in &isas {
                assert_eq!(
                    bitv(&grad(isa, cin)),
                    bitv(&dm),
                    "output gradient, {} cout {cin}",
                    isa.name()
                );
            }
            let out = output(Isa::Generic, cin);
            assert!(out.iter().all(|v| !v.is_nan()), "every output written");
            for &isa in &isas {
                assert_eq!(bitv(&output(isa, cin)), bitv(&out), "output, {} cout {cin}", isa.name());
            }
        }
        // Packed V: whole 8-channel groups (40 = 16 + 16 + 8 on AVX-512).
        let want = input(Isa::Generic, 40, false);
        for &isa in isas.iter().filter(|i| **i != Isa::Generic) {
            assert_eq!(bitv(&input(isa, 40, true)), bitv(&want), "packed input, {}", isa.name());
        }
    }
}
