//! Our own SGEMM: BLIS's blocking on a 6 x 16 micro-kernel (AVX2 + FMA, or
//! portable) or a 12 x 32 one (AVX-512: 24 zmm sums), threaded over rayon.
//! The loop nest is generic over the kernel's MR x NR; below, MR = 6 and
//! NR = 16 describe the AVX2 case (the AVX-512 one: 12 rows, 32 columns,
//! K blocks of [`KC512`], row blocks of [`MC512`]).
//!
//! `C (m, n) (+)= A (m, k) x B (k, n)`, any strides. Packed layouts:
//! - B in 16-column micro-panels, K block by K block ([`KC`] rows): `kc`
//!   rows of 16 floats, the last panel zero-padded;
//! - A in 6-row micro-panels: K in groups of 8, a group the six rows' 8
//!   floats one after the other (element (r, p) at `(p / 8) * 48 + r * 8 +
//!   p % 8`), so packing a row-major A is 8-float copies and a step's six
//!   broadcasts read one 192-byte run.
//!
//! The loops, outermost first:
//! 1. columns of C in blocks of [`NC`] ([`sgemm`]);
//! 2. the up-front packing of the smaller operand: B in runs of K blocks
//!    ([`shared_b`], the usual case) or all of A ([`shared_a`], fewer rows
//!    than columns, e.g. 196 x 4608 x 512), by all threads together;
//! 3. items: C cut into tiles (row block of at most [`MC`], group of B's
//!    panels) chosen by [`items`] so that every thread gets at least two and
//!    re-packing is least; each item owns its tile (`split_tiles`, no
//!    shared writable view) and packs its share of the other operand;
//! 4. K blocks, in order;
//! 5. B micro-panels of the tile (in L1) and
//! 6. A micro-panels (from L2): one micro-kernel call each, a 6 x 16 block
//!    of C held in 12 ymm registers over the K block, then added to C (or
//!    stored, on the first block without `accumulate`). Between calls the
//!    next K block's rows the item will pack are prefetched ([`Ahead`]):
//!    packing is otherwise bound by memory.
//!
//! Every element of C is the same sum in the same order whatever item or
//! thread computes it (K blocks in order, each a plain k loop), so results
//! are bit-identical for any thread count and any cut.
//!
//! Kernels: AVX2 + FMA (x86-64-v3; AVX-512 machines run it too), whose
//! inner loop is assembly ([`fma_groups`], shared with Winograd's GEMMs),
//! and a portable one in plain Rust; both tested against a naive GEMM
//! (`tests/gemm.rs`), threaded against one thread bit for bit.

use crate::tensor::dispatch::Isa;
use crate::tensor::gemm::split_tiles;
use ndarray::{s, ArrayViewMut2};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;

/// Rows of a micro-panel of A (the micro-kernel's height).
pub const MR: usize = 6;
/// Columns of a micro-panel of B (two ymm registers).
pub const NR: usize = 16;
/// K block: a B micro-panel is `KC * NR * 4` = 20 KiB, with the A
/// micro-panel streaming past it (7.5 KiB) inside a 32 KiB L1d. Measured on
/// AVX2 (Zen 3) at 784 x 4608 x 512 and 2048^3, 2 threads: 256 154-169,
/// 320 170-172, 384 169-171, 512 155-170 GFLOP/s.
pub const KC: usize = 320;
/// Most rows of A packed at once: `MC * KC * 4` = 216 KiB, inside a 512 KiB L2.
pub const MC: usize = 216;
/// Columns of C done at once (B's packed K blocks span this many).
pub const NC: usize = 4096;

/// A matrix operand: base pointer and element strides.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

thread_local! {
    /// The packing buffer of an item (A's rows, or B's columns), kept by
    /// each thread across calls (borrowed only while one item runs, which
    /// makes no rayon call, so never re-entered).
    static ITEM_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Buffers shared by the threads of one call (the operand packed up front):
/// taken from this pool and given back, so a thread that waits in rayon
/// and picks up another call meanwhile never finds its own buffer
/// borrowed. Each keeps its largest size (at most 16 MiB) for later calls.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A 64-byte aligned slice of `len` floats inside `v` (grown as needed).
fn aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + 16 {
        v.resize(len + 16, 0.0);
    }
    let off = v.as_ptr().align_offset(64);
    assert!(off < 16, "cannot align a packing buffer");
    &mut v[off..off + len]
}

// SAFETY: `Mat` only reads, and the caller of `sgemm` guarantees the
// matrices outlive the call and are not written meanwhile.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// `C (m, n) = A (m, k) x B (k, n)`, or `C += A x B` with `accumulate`, on
/// `isa`'s micro-kernel (12 x 32 for `Avx512`, 6 x 16 AVX2 for `Avx2`, the
/// portable 6 x 16 for `Generic`), on rayon's pool with
/// `parallel`, else on the calling thread (see the module's notes). With
/// `accumulate == false` C is never read.
///
/// # Safety
/// `a` and `b` address readable (m, k) and (k, n) matrices (m, n from `c`)
/// that nobody writes during the call.
pub unsafe fn sgemm(isa: Isa, k: usize, a: Mat, b: Mat, mut c: ArrayViewMut2<f32>, accumulate: bool, parallel: bool) {
    let (m, n) = c.dim();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    assert!(isa.supported(), "sgemm: this CPU cannot run the {} kernel", isa.name());
    match isa {
        Isa::Avx512 => sgemm_on::<12, 32>(Geo::AVX512, k, a, b, c, accumulate, parallel),
        Isa::Avx2 => sgemm_on::<MR, NR>(Geo::AVX2, k, a, b, c, accumulate, parallel),
        Isa::Generic => sgemm_on::<MR, NR>(Geo::GENERIC, k, a, b, c, accumulate, parallel),
    }
}

/// Which micro-kernel runs, with its blocking (its MR x NR are the const
/// parameters of the functions below).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kern {
    Avx2,
    Avx512,
    Generic,
}

impl Kern {
    /// The kernel's block of C, MR x NR.
    fn shape(self) -> (usize, usize) {
        match self {
            Kern::Avx512 => (12, 32),
            Kern::Avx2 | Kern::Generic => (MR, NR),
        }
    }
}

/// A micro-kernel and its K block and row block.
#[derive(Clone, Copy, Debug)]
struct Geo {
    kern: Kern,
    kc: usize,
    mc: usize,
}

impl Geo {
    const AVX2: Geo = Geo {
        kern: Kern::Avx2,
        kc: KC,
        mc: MC,
    };
    const GENERIC: Geo = Geo {
        kern: Kern::Generic,
        kc: KC,
        mc: MC,
    };
    /// The 12 x 32 kernel: a B micro-panel of `KC512 * 32 * 4` bytes in a
    /// 48 KiB L1d, the row block `MC512 * KC512 * 4` in L2.
    const AVX512: Geo = Geo {
        kern: Kern::Avx512,
        kc: KC512,
        mc: MC512,
    };
}

/// K block of the AVX-512 kernel (a 32 KiB B micro-panel in the 48 KiB
/// L1d of Zen 5). KC 128-384 x MC 192-768 measured inside the noise
/// (2026-12-02, Zen 5, 2 threads: 290-400 GFLOP/s at VGG-16's shapes).
pub const KC512: usize = 256;
/// Row block of the AVX-512 kernel (384 KiB of packed A in a 1 MiB L2).
pub const MC512: usize = 384;

/// [`sgemm`] on the `MR` x `NR` micro-kernel `g`.
unsafe fn sgemm_on<const MR: usize, const NR: usize>(
    g: Geo,
    k: usize,
    a: Mat,
    b: Mat,
    mut c: ArrayViewMut2<f32>,
    accumulate: bool,
    parallel: bool,
) {
    let (m, n) = c.dim();
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    // LOOP 1: columns of C in blocks of NC.
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let panels = nc.div_ceil(NR);
        // Pack the smaller operand up front (A whole, or B in runs).
        let a_shared = m < nc && m * k <= SHARED_B_FLOATS;
        let Items {
            mc,
            row_blocks,
            col_groups,
        } = items::<MR, NR>(m, panels, threads, g.mc, a_shared);
        let per_group = panels.div_ceil(col_groups);
        let cut = Cut {
            nr: NR,
            jc,
            mc,
            row_blocks,
            per_group,
            col_groups,
        };
        let cblock = c.slice_mut(s![.., jc..jc + nc]);
        if a_shared {
            shared_a::<MR, NR>(g, k, a, b, cut, cblock, accumulate, threads);
        } else {
            shared_b::<MR, NR>(g, k, a, b, cut, cblock, accumulate, threads);
        }
    }
}

/// How a block of C's columns is cut into items: rows in `row_blocks`
/// blocks of `mc`, the block's panels in `col_groups` groups of
/// `per_group`; `jc` the block's first column in B.
#[derive(Clone, Copy)]
struct Cut {
    /// Columns of a micro-panel.
    nr: usize,
    jc: usize,
    mc: usize,
    row_blocks: usize,
    per_group: usize,
    col_groups: usize,
}

impl Cut {
    /// The items' tiles of `c` (this block of columns), item `t` = (row
    /// block `t / col_groups`, column group `t % col_groups`) at index `t`:
    /// each item owns its tile, so workers never share a writable view.
    fn tiles<'a>(&self, c: ArrayViewMut2<'a, f32>) -> Vec<(usize, usize, ArrayViewMut2<'a, f32>)> {
        let tiles = split_tiles(c, self.mc, self.per_group * self.nr);
        debug_assert_eq!(tiles.len(), self.row_blocks * self.col_groups);
        tiles
    }
}

/// Runs `item` on every tile, on rayon's pool when `parallel`.
fn each_tile<'a>(
    tiles: Vec<(usize, usize, ArrayViewMut2<'a, f32>)>,
    parallel: bool,
    item: impl Fn((usize, usize, ArrayViewMut2<'a, f32>)) + Sync + Send,
) {
    if parallel && tiles.len() > 1 {
        tiles.into_par_iter().for_each(item);
    } else {
        tiles.into_iter().for_each(item);
    }
}

/// Most floats of B packed at once by [`shared_b`], and of A by [`shared_a`]
/// (16 MiB).
const SHARED_B_FLOATS: usize = 4 << 20;

/// [`sgemm`]'s main nest: B packed by all threads together, as many K
/// blocks at once as fit [`SHARED_B_FLOATS`] (all of them at VGG-16's
/// shapes), then one item per tile (row block, column group), each going
/// through those K blocks packing its own rows of A. Two barriers per
/// packed run of K blocks (a barrier per K block cost a tenth of the time
/// where a block's work is a fraction of a millisecond).
///
/// # Safety
/// As [`sgemm`]; `c` is the block of columns `cut.jc..` of C.
#[allow(clippy::too_many_arguments)]
unsafe fn shared_b<const MR: usize, const NR: usize>(
    g: Geo,
    k: usize,
    a: Mat,
    b: Mat,
    cut: Cut,
    mut c: ArrayViewMut2<f32>,
    accumulate: bool,
    threads: usize,
) {
    let parallel = threads > 1;
    let (jc, nc) = (cut.jc, c.ncols());
    let panels = nc.div_ceil(NR);
    // Packed K block q of the run at q * block_len, its panel jr at
    // jr * NR * kc within.
    let block_len = g.kc.min(k) * panels * NR;
    let run_blocks = (SHARED_B_FLOATS / block_len).max(1).min(k.div_ceil(g.kc));
    let mut bbuf = POOL.lock().map(|mut p| p.pop()).unwrap_or_default().unwrap_or_default();
    let bp = aligned(&mut bbuf, block_len * run_blocks);
    // LOOP 2: K in runs of K blocks.
    for p0 in (0..k).step_by(g.kc * run_blocks) {
        let blocks = (k - p0).div_ceil(g.kc).min(run_blocks);
        // Pack the run: one task per K block, in groups of 8 panels.
        const PACK_PANELS: usize = 8;
        let pack = |(q, blk): (usize, &mut [f32])| {
            let pc = p0 + q * g.kc;
            let kc = g.kc.min(k - pc);
            let blk = &mut blk[..panels * NR * kc];
            for (g, dst) in blk.chunks_mut(PACK_PANELS * NR * kc).enumerate() {
                let j0 = g * PACK_PANELS * NR;
                pack_b::<NR>(b, pc, kc, jc + j0, nc.min(j0 + PACK_PANELS * NR) - j0, dst);
            }
        };
        let bp = &mut bp[..block_len * blocks];
        if parallel {
            bp.par_chunks_mut(block_len).enumerate().for_each(pack);
        } else {
            bp.chunks_mut(block_len).enumerate().for_each(pack);
        }
        let bp = &*bp;
        // LOOP 3: the items, each its own tile of C.
        each_tile(cut.tiles(c.view_mut()), parallel, |(ic, j0, mut tile)| {
            let (rows_here, ncols) = tile.dim();
            let jr0 = j0 / NR;
            ITEM_BUF.with(|abuf| {
                let abuf = &mut *abuf.borrow_mut();
                let ap = aligned(abuf, a_panel_len::<MR>(g.kc.min(k)) * rows_here.div_ceil(MR));
                // LOOP 4: the run's K blocks.
                for q in 0..blocks {
                    let pc = p0 + q * g.kc;
                    let kc = g.kc.min(k - pc);
                    let beta = accumulate || pc > 0;
                    pack_a::<MR>(a, ic, rows_here, pc, kc, ap);
                    let kn = g.kc.min(k.saturating_sub(pc + kc));
                    let calls = ncols.div_ceil(NR) * rows_here.div_ceil(MR);
                    let mut ahead = Ahead::new(a, (ic, pc + kc), rows_here, kn, calls);
                    let bq = &bp[q * block_len..];
                    micro_panels::<MR, NR, true>(g, kc, ap, &bq[jr0 * NR * kc..], tile.view_mut(), beta, &mut ahead);
                }
            });
        });
    }
    if let Ok(mut pool) = POOL.lock() {
        pool.push(bbuf);
    }
}

/// [`sgemm`] when A is the smaller operand (fewer rows than columns, e.g.
/// 196 or 256 x 4608 x 512): A packed once for every K block by all
/// threads together, then one item per tile (row block, column group),
/// each packing its own panels of B block after block while the kernels
/// prefetch the next. The mirror of [`shared_b`]: whatever is packed up
/// front comes from memory before any kernel runs, so the smaller operand
/// goes there (the whole of B up front cost a fifth of the time at 256 x
/// 4608 x 512).
///
/// # Safety
/// As [`sgemm`]; `c` is the block of columns `cut.jc..` of C.
#[allow(clippy::too_many_arguments)]
unsafe fn shared_a<const MR: usize, const NR: usize>(
    g: Geo,
    k: usize,
    a: Mat,
    b: Mat,
    cut: Cut,
    mut c: ArrayViewMut2<f32>,
    accumulate: bool,
    threads: usize,
) {
    let parallel = threads > 1;
    let m = c.nrows();
    let mp = m.div_ceil(MR);
    // K block q starts at q * g.kc; its packed rows at q * block_len, row
    // panel i at i * a_panel_len::<MR>(kc) within.
    let block_len = a_panel_len::<MR>(g.kc.min(k)) * mp;
    let blocks = k.div_ceil(g.kc);
    let mut abuf = POOL.lock().map(|mut p| p.pop()).unwrap_or_default().unwrap_or_default();
    let ap = aligned(&mut abuf, block_len * blocks);
    let pack = |(q, dst): (usize, &mut [f32])| {
        let pc = q * g.kc;
        pack_a::<MR>(a, 0, m, pc, g.kc.min(k - pc), dst)
    };
    if parallel {
        ap.par_chunks_mut(block_len).enumerate().for_each(pack);
    } else {
        ap.chunks_mut(block_len).enumerate().for_each(pack);
    }
    let ap = &*ap;
    // LOOP 3: the items, each its own tile of C.
    each_tile(cut.tiles(c.view_mut()), parallel, |(ic, j0, mut tile)| {
        let (rows_here, ncols) = tile.dim();
        let jp = ncols.div_ceil(NR);
        ITEM_BUF.with(|bbuf| {
            let bbuf = &mut *bbuf.borrow_mut();
            let bp = aligned(bbuf, g.kc.min(k) * jp * NR);
            // LOOP 4: every K block.
            for q in 0..blocks {
                let pc = q * g.kc;
                let kc = g.kc.min(k - pc);
                let beta = accumulate || pc > 0;
                pack_b::<NR>(b, pc, kc, cut.jc + j0, ncols, bp);
                let kn = g.kc.min(k.saturating_sub(pc + kc));
                let calls = jp * rows_here.div_ceil(MR);
                let mut ahead = Ahead::new(b, (pc + kc, cut.jc + j0), kn, ncols, calls);
                let aq = &ap[q * block_len + (ic / MR) * a_panel_len::<MR>(kc)..];
                micro_panels::<MR, NR, false>(g, kc, aq, bp, tile.view_mut(), beta, &mut ahead);
            }
        });
    });
    if let Ok(mut pool) = POOL.lock() {
        pool.push(abuf);
    }
}

/// LOOPs 5 and 6: every (B micro-panel, A micro-panel) pair of a tile of C
/// through the micro-kernel, `ahead` stepped after each call. `ap` holds
/// the tile's rows packed (panels `a_panel_len::<MR>(kc)` apart), `bp` its
/// columns (panels `NR * kc` apart), both over one K block of `kc`.
unsafe fn micro_panels<const MR: usize, const NR: usize, const B_FROM_L3: bool>(
    g: Geo,
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    mut tile: ArrayViewMut2<f32>,
    beta: bool,
    ahead: &mut Ahead,
) {
    let (rows, cols) = tile.dim();
    let (rsc, csc) = (tile.strides()[0], tile.strides()[1]);
    let c0 = tile.as_mut_ptr();
    let (jp, ip) = (cols.div_ceil(NR), rows.div_ceil(MR));
    // With `B_FROM_L3` (B packed whole by [`shared_b`]) the next B
    // micro-panel's cache lines, a share before each call: its first pass
    // stalled the kernel for want of it (~5% at 784 x 4608 x 512 on AVX2).
    // [`shared_a`]'s B was just packed into L2: asking for it there was
    // slower (0.88-0.93 of OpenBLAS at 256 x 4608 x 512, 0.97-1.05
    // without). The 12 x 32 AVX-512 kernel measured level with it
    // (0.98-1.02, one thread).
    for jr in 0..jp {
        let bpanel = bp[jr * NR * kc..].as_ptr();
        let next = (B_FROM_L3 && jr + 1 < jp).then(|| bpanel.wrapping_add(NR * kc));
        let ccols = NR.min(cols - jr * NR);
        for ir in 0..ip {
            if let Some(nb) = next {
                prefetch_share(nb, NR * kc, ir, ip);
            }
            let apanel = ap[ir * a_panel_len::<MR>(kc)..].as_ptr();
            let crows = MR.min(rows - ir * MR);
            let cblk = c0.offset((ir * MR) as isize * rsc + (jr * NR) as isize * csc);
            block::<MR, NR>(g.kern, kc, apanel, bpanel, cblk, rsc, csc, crows, ccols, beta);
            ahead.step();
        }
    }
}

/// How one K block's work is cut into items: rows in `row_blocks` blocks
/// of `mc` (whole micro-panels), B's panels in `col_groups` groups.
#[derive(Debug, PartialEq, Eq)]
struct Items {
    mc: usize,
    row_blocks: usize,
    col_groups: usize,
}

/// Picks the cut for `m` rows and `panels` panels of NR columns on
/// `threads` threads. With B packed up front ([`shared_b`]) an item packs
/// its rows of A (re-packed once per column group) and streams its
/// columns of B from L3 (re-read once per row block), so tall items over
/// wide groups move the least. With A packed up front ([`shared_a`],
/// `a_shared`) the roles swap, and packing B (from memory, once per row
/// block) weighs twice what streaming packed A from L3 does: whole-height
/// items are preferred. With several threads there must be at least two
/// items a thread (work stealing evens out a slowed core) and whole rounds
/// of them. Rows per block at most `mc_max` (the packed block stays in L2),
/// or half as many again with A shared (no item packs it).
fn items<const MR: usize, const NR: usize>(
    m: usize,
    panels: usize,
    threads: usize,
    mc_max: usize,
    a_shared: bool,
) -> Items {
    let (row_weight, mc_max) = if a_shared { (2.0, mc_max * 3 / 2) } else { (1.0, mc_max) };
    let mut best: Option<(f64, Items)> = None;
    for col_groups in 1..=panels.min(16) {
        let cols = panels.div_ceil(col_groups) * NR;
        let col_groups = panels.div_ceil(panels.div_ceil(col_groups));
        let want = if threads > 1 {
            (2 * threads).div_ceil(col_groups)
        } else {
            1
        };
        let fewest = m.div_ceil(mc_max).max(want).min(m.div_ceil(MR));
        // A few more row blocks than the fewest, for whole rounds.
        for row_blocks in fewest..=(fewest + threads - 1).min(m.div_ceil(MR)) {
            let mc = m.div_ceil(row_blocks).div_ceil(MR) * MR;
            let row_blocks = m.div_ceil(mc);
            let n_items = row_blocks * col_groups;
            let rounds = n_items.div_ceil(threads) as f64 * threads as f64 / n_items as f64;
            let cost = rounds * (1.0 + 8.0 * (row_weight / mc.min(m) as f64 + 1.0 / cols as f64));
            if best.as_ref().is_none_or(|(c, _)| cost < *c - 1e-9) {
                best = Some((
                    cost,
                    Items {
                        mc,
                        row_blocks,
                        col_groups,
                    },
                ));
            }
        }
    }
    best.expect("at least one column group").1
}

/// One `rows` x `cols` block of C (at most 6 x 16) from a pair of packed
/// micro-panels.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn block<const MR: usize, const NR: usize>(
    kern: Kern,
    kc: usize,
    apanel: *const f32,
    bpanel: *const f32,
    cblk: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    beta: bool,
) {
    debug_assert_eq!(kern.shape(), (MR, NR), "{kern:?} is not a {MR} x {NR} kernel");
    if rows == MR && cols == NR && csc == 1 {
        kernel(kern, kc, apanel, bpanel, cblk, rsc, beta);
    } else {
        // Edge: the whole block into a buffer, then the valid part into C
        // (the same sums).
        let mut tmp = Aligned([0.0f32; 12 * 32]);
        assert!(MR * NR <= tmp.0.len(), "a {MR} x {NR} kernel");
        kernel(kern, kc, apanel, bpanel, tmp.0.as_mut_ptr(), NR as isize, false);
        for r in 0..rows {
            for j in 0..cols {
                let p = cblk.offset(r as isize * rsc + j as isize * csc);
                let v = tmp.0[r * NR + j];
                *p = if beta { *p + v } else { v };
            }
        }
    }
}

#[repr(align(64))]
struct Aligned([f32; 12 * 32]);

#[inline]
unsafe fn kernel(kern: Kern, kc: usize, a: *const f32, b: *const f32, c: *mut f32, rsc: isize, beta: bool) {
    #[cfg(target_arch = "x86_64")]
    match kern {
        Kern::Avx512 => return kernel_avx512(kc, a, b, c, rsc, beta),
        Kern::Avx2 => return kernel_avx2(kc, a, b, c, rsc, beta),
        Kern::Generic => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kern;
    kernel_generic(kc, a, b, c, rsc, beta)
}

/// B rows `pc..pc+kc`, columns `jc..jc+nc` into micro-panels of [`NR`]
/// columns: panel `j` at `j * NR * kc`, row `p` of it at `p * NR`.
unsafe fn pack_b<const NR: usize>(b: Mat, pc: usize, kc: usize, jc: usize, nc: usize, dst: &mut [f32]) {
    let full = nc / NR;
    if b.cs == 1 {
        // Row-major B: each row read once, left to right, its 16-float runs
        // dealt to the panels (strided reads down a panel ran at a fraction
        // of the bandwidth).
        let row = |p: usize| b.ptr.offset((pc + p) as isize * b.rs + jc as isize);
        for p0 in (0..kc).step_by(8) {
            // The next 8 rows' runs, asked for now: the reads hop between
            // rows 64 bytes at a time, which the hardware prefetcher does
            // not follow (the loads missed on most runs without this).
            for p in (p0 + 8)..kc.min(p0 + 16) {
                for l in (0..full * NR).step_by(16) {
                    prefetch(row(p).add(l));
                }
            }
            for jr in 0..full {
                for p in p0..kc.min(p0 + 8) {
                    let src = b.ptr.offset((pc + p) as isize * b.rs + (jc + jr * NR) as isize);
                    let run = &mut dst[jr * NR * kc + p * NR..][..NR];
                    run.copy_from_slice(&*(src as *const [f32; NR]));
                }
            }
        }
    } else {
        for jr in 0..full {
            let base = b.ptr.offset(pc as isize * b.rs + (jc + jr * NR) as isize * b.cs);
            for (p, row) in dst[jr * NR * kc..][..NR * kc].chunks_exact_mut(NR).enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = *base.offset(p as isize * b.rs + j as isize * b.cs);
                }
            }
        }
    }
    if full * NR < nc {
        // The last, partial panel, zero-padded.
        let cols = nc - full * NR;
        let base = b.ptr.offset(pc as isize * b.rs + (jc + full * NR) as isize * b.cs);
        for (p, row) in dst[full * NR * kc..][..NR * kc].chunks_exact_mut(NR).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = if j < cols {
                    *base.offset(p as isize * b.rs + j as isize * b.cs)
                } else {
                    0.0
                };
            }
        }
    }
}

/// Asks for the cache line at `p` (a hint; no effect off x86-64).
#[inline(always)]
fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Share `part` of `parts` of the cache lines of the `len` floats at `p`,
/// asked for into L1: a run read soon, spread over the calls before it.
#[inline(always)]
pub(crate) fn prefetch_share(p: *const f32, len: usize, part: usize, parts: usize) {
    let lines = len.div_ceil(16);
    let per = lines.div_ceil(parts.max(1));
    for l in part * per..((part + 1) * per).min(lines) {
        prefetch(p.wrapping_add(l * 16));
    }
}

/// The next K block's rows of a row-major operand, asked for a few cache
/// lines at a time between micro-kernel calls, so that packing them reads
/// from L2 instead of waiting on memory (packing ran at the machine's
/// memory bandwidth, a quarter of a call's time at 196 x 4608 x 512,
/// while the kernels' memory sat idle).
struct Ahead {
    base: *const f32,
    rs: isize,
    row_lines: usize,
    /// The next line: row `r`, line `l` of it.
    r: usize,
    l: usize,
    rows: usize,
    per_call: usize,
}

impl Ahead {
    /// `rows` rows of `cols` floats of `m` from element `(r0, c0)` (a
    /// row-major operand; any other layout asks for nothing), spread over
    /// `calls`.
    fn new(m: Mat, (r0, c0): (usize, usize), rows: usize, cols: usize, calls: usize) -> Ahead {
        let row_lines = cols.div_ceil(16);
        let rows = if m.cs == 1 { rows } else { 0 };
        Ahead {
            base: m.ptr.wrapping_offset(r0 as isize * m.rs + c0 as isize),
            rs: m.rs,
            row_lines,
            r: 0,
            l: 0,
            rows,
            per_call: (rows * row_lines).div_ceil(calls.max(1)),
        }
    }

    /// Asks for the next share of lines (into L2: the block is several
    /// times L1's size, and the kernels' panels live there).
    #[inline]
    fn step(&mut self) {
        for _ in 0..self.per_call {
            if self.r >= self.rows {
                return;
            }
            prefetch_l2(
                self.base
                    .wrapping_offset(self.r as isize * self.rs + (self.l * 16) as isize),
            );
            self.l += 1;
            if self.l == self.row_lines {
                self.l = 0;
                self.r += 1;
            }
        }
    }
}

/// As [`prefetch`], into L2 only where the CPU distinguishes.
#[inline(always)]
fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Floats of one packed A micro-panel over `kc` (K rounded up to whole
/// groups of 8).
fn a_panel_len<const MR: usize>(kc: usize) -> usize {
    kc.div_ceil(8) * 8 * MR
}

/// A rows `ic..ic+mc`, columns `pc..pc+kc` into micro-panels of [`MR`]
/// rows: panel `i` at `i * a_panel_len::<MR>(kc)`, element (r, p) of it at
/// `(p / 8) * 48 + r * 8 + p % 8`. Rows past `mc` and the tail group's
/// unused lanes are zero.
unsafe fn pack_a<const MR: usize>(a: Mat, ic: usize, mc: usize, pc: usize, kc: usize, dst: &mut [f32]) {
    let len = a_panel_len::<MR>(kc);
    for (ir, panel) in dst[..mc.div_ceil(MR) * len].chunks_exact_mut(len).enumerate() {
        let i0 = ic + ir * MR;
        let rows = MR.min(ic + mc - i0);
        let base = a.ptr.offset(i0 as isize * a.rs + pc as isize * a.cs);
        if a.cs == 1 {
            // Row-major A: 8-float runs of each row.
            // The next panel's rows, fetched while this one is copied
            // (1 KiB runs of rows far apart end before the hardware
            // prefetcher has ramped up).
            let next = (rows == MR && i0 + 2 * MR <= ic + mc).then(|| base.offset(MR as isize * a.rs));
            for (g, group) in panel.chunks_exact_mut(8 * MR).enumerate() {
                let p0 = g * 8;
                let w = 8.min(kc - p0);
                if let Some(nb) = next.filter(|_| g % 2 == 0) {
                    for r in 0..MR {
                        prefetch(nb.offset(r as isize * a.rs + p0 as isize));
                    }
                }
                for (r, run) in group.chunks_exact_mut(8).enumerate() {
                    if r < rows && w == 8 {
                        let src = base.offset(r as isize * a.rs + p0 as isize) as *const [f32; 8];
                        run.copy_from_slice(&*src);
                    } else if r < rows {
                        let src = std::slice::from_raw_parts(base.offset(r as isize * a.rs + p0 as isize), w);
                        run[..w].copy_from_slice(src);
                        run[w..].fill(0.0);
                    } else {
                        run.fill(0.0);
                    }
                }
            }
        } else {
            // Any other layout (a transposed view is column-major): one
            // element at a time, K outermost so columns are read in order.
            panel.fill(0.0);
            for p in 0..kc {
                let src = base.offset(p as isize * a.cs);
                let dst = &mut panel[(p / 8) * 8 * MR + p % 8..];
                for r in 0..rows {
                    dst[r * 8] = *src.offset(r as isize * a.rs);
                }
            }
        }
    }
}

/// One step `u` of a group: two B loads, six broadcasts (A's element
/// (r, u) of the group at r * 8 + u), twelve FMAs into ymm0-5 / ymm6-11.
#[cfg(target_arch = "x86_64")]
macro_rules! fma_step {
    ($u:literal) => {
        concat!(
            "vmovaps ymm12, [{b} + ",
            $u,
            " * 64]\n",
            "vmovaps ymm13, [{b} + ",
            $u,
            " * 64 + 32]\n",
            "vbroadcastss ymm14, [{a} + ",
            $u,
            " * 4]\n",
            "vfmadd231ps ymm0, ymm12, ymm14\n",
            "vfmadd231ps ymm6, ymm13, ymm14\n",
            "vbroadcastss ymm14, [{a} + ",
            $u,
            " * 4 + 32]\n",
            "vfmadd231ps ymm1, ymm12, ymm14\n",
            "vfmadd231ps ymm7, ymm13, ymm14\n",
            "vbroadcastss ymm14, [{a} + ",
            $u,
            " * 4 + 64]\n",
            "vfmadd231ps ymm2, ymm12, ymm14\n",
            "vfmadd231ps ymm8, ymm13, ymm14\n",
            "vbroadcastss ymm14, [{a} + ",
            $u,
            " * 4 + 96]\n",
            "vfmadd231ps ymm3, ymm12, ymm14\n",
            "vfmadd231ps ymm9, ymm13, ymm14\n",
            "vbroadcastss ymm14, [{a} + ",
            $u,
            " * 4 + 128]\n",
            "vfmadd231ps ymm4, ymm12, ymm14\n",
            "vfmadd231ps ymm10, ymm13, ymm14\n",
            "vbroadcastss ymm14, [{a} + ",
            $u,
            " * 4 + 160]\n",
            "vfmadd231ps ymm5, ymm12, ymm14\n",
            "vfmadd231ps ymm11, ymm13, ymm14",
        )
    };
}

/// `groups` groups of 8 steps of the 6 x 16 micro-kernel: A in the
/// micro-panel layout (a group the six rows' 8 floats, 192 bytes), B in
/// 16-float rows (32-byte aligned); sums in `s0` (columns 0-7) and `s1`
/// (8-15); `a` and `b` advanced past what was read. In assembly: as Rust,
/// LLVM hoisted the next step's B loads and spilled a sum to the stack in
/// every group. The next groups of A are prefetched from L2 (three lines
/// a group). Shared by our SGEMM and Winograd's GEMMs (`direct.rs`).
///
/// # Safety
/// AVX2 + FMA present; `a` and `b` readable for `groups` groups; `b`
/// 32-byte aligned.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn fma_groups(
    a: &mut *const f32,
    b: &mut *const f32,
    groups: usize,
    s0: &mut [std::arch::x86_64::__m256; MR],
    s1: &mut [std::arch::x86_64::__m256; MR],
) {
    if groups == 0 {
        return;
    }
    std::arch::asm!(
        "2:",
        "prefetcht0 [{a} + 512]",
        "prefetcht0 [{a} + 576]",
        "prefetcht0 [{a} + 640]",
        fma_step!("0"),
        fma_step!("1"),
        fma_step!("2"),
        fma_step!("3"),
        fma_step!("4"),
        fma_step!("5"),
        fma_step!("6"),
        fma_step!("7"),
        "add {a}, 192",
        "add {b}, 512",
        "dec {g}",
        "jnz 2b",
        a = inout(reg) *a,
        b = inout(reg) *b,
        g = inout(reg) groups => _,
        inout("ymm0") s0[0], inout("ymm1") s0[1], inout("ymm2") s0[2],
        inout("ymm3") s0[3], inout("ymm4") s0[4], inout("ymm5") s0[5],
        inout("ymm6") s1[0], inout("ymm7") s1[1], inout("ymm8") s1[2],
        inout("ymm9") s1[3], inout("ymm10") s1[4], inout("ymm11") s1[5],
        out("ymm12") _, out("ymm13") _, out("ymm14") _,
        options(nostack, readonly),
    );
}

/// The 6 x 16 block `c` (rows `rsc` apart, contiguous columns) `=` (or `+=`
/// with `beta`) the packed micro-panels' product over `kc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rsc: isize, beta: bool) {
    use std::arch::x86_64::*;
    let mut s0 = [_mm256_setzero_ps(); MR];
    let mut s1 = [_mm256_setzero_ps(); MR];
    for r in 0..MR {
        _mm_prefetch::<_MM_HINT_T0>(c.offset(r as isize * rsc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.offset(r as isize * rsc + 15) as *const i8);
    }
    let (mut ap, mut bp) = (a, b);
    fma_groups(&mut ap, &mut bp, kc / 8, &mut s0, &mut s1);
    for u in 0..kc % 8 {
        let b0 = _mm256_load_ps(bp.add(u * NR));
        let b1 = _mm256_load_ps(bp.add(u * NR + 8));
        for r in 0..MR {
            let av = _mm256_broadcast_ss(&*ap.add(r * 8 + u));
            s0[r] = _mm256_fmadd_ps(av, b0, s0[r]);
            s1[r] = _mm256_fmadd_ps(av, b1, s1[r]);
        }
    }
    for r in 0..MR {
        let p = c.offset(r as isize * rsc);
        if beta {
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), s0[r]));
            _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), s1[r]));
        } else {
            _mm256_storeu_ps(p, s0[r]);
            _mm256_storeu_ps(p.add(8), s1[r]);
        }
    }
}

/// One step `u` of a group of the 12 x 32 kernel: two B loads, twelve
/// broadcasts (A's element (r, u) of the group at r * 8 + u), 24 FMAs into
/// zmm0-11 (columns 0-15) and zmm12-23 (16-31).
#[cfg(target_arch = "x86_64")]
macro_rules! fma_step512 {
    ($u:literal) => {
        concat!(
            "vmovups zmm24, [{b} + ",
            $u,
            " * 128]\n",
            "vmovups zmm25, [{b} + ",
            $u,
            " * 128 + 64]\n",
            "vbroadcastss zmm26, [{a} + ",
            $u,
            " * 4]\n",
            "vfmadd231ps zmm0, zmm24, zmm26\n",
            "vfmadd231ps zmm12, zmm25, zmm26\n",
            "vbroadcastss zmm27, [{a} + ",
            $u,
            " * 4 + 32]\n",
            "vfmadd231ps zmm1, zmm24, zmm27\n",
            "vfmadd231ps zmm13, zmm25, zmm27\n",
            "vbroadcastss zmm26, [{a} + ",
            $u,
            " * 4 + 64]\n",
            "vfmadd231ps zmm2, zmm24, zmm26\n",
            "vfmadd231ps zmm14, zmm25, zmm26\n",
            "vbroadcastss zmm27, [{a} + ",
            $u,
            " * 4 + 96]\n",
            "vfmadd231ps zmm3, zmm24, zmm27\n",
            "vfmadd231ps zmm15, zmm25, zmm27\n",
            "vbroadcastss zmm26, [{a} + ",
            $u,
            " * 4 + 128]\n",
            "vfmadd231ps zmm4, zmm24, zmm26\n",
            "vfmadd231ps zmm16, zmm25, zmm26\n",
            "vbroadcastss zmm27, [{a} + ",
            $u,
            " * 4 + 160]\n",
            "vfmadd231ps zmm5, zmm24, zmm27\n",
            "vfmadd231ps zmm17, zmm25, zmm27\n",
            "vbroadcastss zmm26, [{a} + ",
            $u,
            " * 4 + 192]\n",
            "vfmadd231ps zmm6, zmm24, zmm26\n",
            "vfmadd231ps zmm18, zmm25, zmm26\n",
            "vbroadcastss zmm27, [{a} + ",
            $u,
            " * 4 + 224]\n",
            "vfmadd231ps zmm7, zmm24, zmm27\n",
            "vfmadd231ps zmm19, zmm25, zmm27\n",
            "vbroadcastss zmm26, [{a} + ",
            $u,
            " * 4 + 256]\n",
            "vfmadd231ps zmm8, zmm24, zmm26\n",
            "vfmadd231ps zmm20, zmm25, zmm26\n",
            "vbroadcastss zmm27, [{a} + ",
            $u,
            " * 4 + 288]\n",
            "vfmadd231ps zmm9, zmm24, zmm27\n",
            "vfmadd231ps zmm21, zmm25, zmm27\n",
            "vbroadcastss zmm26, [{a} + ",
            $u,
            " * 4 + 320]\n",
            "vfmadd231ps zmm10, zmm24, zmm26\n",
            "vfmadd231ps zmm22, zmm25, zmm26\n",
            "vbroadcastss zmm27, [{a} + ",
            $u,
            " * 4 + 352]\n",
            "vfmadd231ps zmm11, zmm24, zmm27\n",
            "vfmadd231ps zmm23, zmm25, zmm27",
        )
    };
}

/// The 12 x 32 block `c` (rows `rsc` apart, contiguous columns) `=` (or
/// `+=` with `beta`) the packed micro-panels' product over `kc`: A in
/// 12-row micro-panels (a group of 8 steps 96 floats), B in 32-float rows.
/// The groups in assembly (24 sums in zmm0-23 throughout, as
/// [`fma_groups`] for AVX2; prefetching A's next groups from L2 measured
/// no faster).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rsc: isize, beta: bool) {
    use std::arch::x86_64::*;
    const R: usize = 12;
    const W: usize = 32;
    let mut s0 = [_mm512_setzero_ps(); R];
    let mut s1 = [_mm512_setzero_ps(); R];
    for r in 0..R {
        _mm_prefetch::<_MM_HINT_T0>(c.offset(r as isize * rsc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.offset(r as isize * rsc + 31) as *const i8);
    }
    let (mut ap, mut bp) = (a, b);
    let groups = kc / 8;
    if groups > 0 {
        std::arch::asm!(
            "2:",
            fma_step512!("0"),
            fma_step512!("1"),
            fma_step512!("2"),
            fma_step512!("3"),
            fma_step512!("4"),
            fma_step512!("5"),
            fma_step512!("6"),
            fma_step512!("7"),
            "add {a}, 384",
            "add {b}, 1024",
            "dec {g}",
            "jnz 2b",
            a = inout(reg) ap,
            b = inout(reg) bp,
            g = inout(reg) groups => _,
            inout("zmm0") s0[0], inout("zmm1") s0[1], inout("zmm2") s0[2],
            inout("zmm3") s0[3], inout("zmm4") s0[4], inout("zmm5") s0[5],
            inout("zmm6") s0[6], inout("zmm7") s0[7], inout("zmm8") s0[8],
            inout("zmm9") s0[9], inout("zmm10") s0[10], inout("zmm11") s0[11],
            inout("zmm12") s1[0], inout("zmm13") s1[1], inout("zmm14") s1[2],
            inout("zmm15") s1[3], inout("zmm16") s1[4], inout("zmm17") s1[5],
            inout("zmm18") s1[6], inout("zmm19") s1[7], inout("zmm20") s1[8],
            inout("zmm21") s1[9], inout("zmm22") s1[10], inout("zmm23") s1[11],
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            options(nostack, readonly),
        );
    }
    for u in 0..kc % 8 {
        let b0 = _mm512_loadu_ps(bp.add(u * W));
        let b1 = _mm512_loadu_ps(bp.add(u * W + 16));
        for r in 0..R {
            let av = _mm512_set1_ps(*ap.add(r * 8 + u));
            s0[r] = _mm512_fmadd_ps(av, b0, s0[r]);
            s1[r] = _mm512_fmadd_ps(av, b1, s1[r]);
        }
    }
    for r in 0..R {
        let p = c.offset(r as isize * rsc);
        if beta {
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), s0[r]));
            _mm512_storeu_ps(p.add(16), _mm512_add_ps(_mm512_loadu_ps(p.add(16)), s1[r]));
        } else {
            _mm512_storeu_ps(p, s0[r]);
            _mm512_storeu_ps(p.add(16), s1[r]);
        }
    }
}

/// [`kernel_avx2`] in plain Rust: the same sums in the same order, with a
/// separate multiply and add (`mul_add` would be a library call on targets
/// without FMA), so it may differ from the AVX2 kernel in the last bits.
unsafe fn kernel_generic(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rsc: isize, beta: bool) {
    let mut s = [[0.0f32; NR]; MR];
    let a = std::slice::from_raw_parts(a, a_panel_len::<MR>(kc));
    let b = std::slice::from_raw_parts(b, kc * NR);
    for (p, bk) in b.chunks_exact(NR).enumerate() {
        let ak = &a[(p / 8) * 8 * MR + p % 8..];
        for r in 0..MR {
            for j in 0..NR {
                s[r][j] += ak[r * 8] * bk[j];
            }
        }
    }
    for (r, sr) in s.iter().enumerate() {
        let row = std::slice::from_raw_parts_mut(c.offset(r as isize * rsc), NR);
        for (x, v) in row.iter_mut().zip(sr) {
            *x = if beta { *x + v } else { *v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_cover_and_spread() {
        for &(m, panels, threads) in &[
            (196, 32, 2),
            (784, 32, 2),
            (65536, 4, 2),
            (5, 1, 2),
            (1, 300, 3),
            (3136, 16, 1),
        ] {
            let it = items::<MR, NR>(m, panels, threads, MC, false);
            assert!(it.mc.is_multiple_of(MR) && it.mc <= MC.max(MR), "{m} {panels}: {it:?}");
            assert!(
                it.row_blocks * it.mc >= m && (it.row_blocks - 1) * it.mc < m,
                "{m}: rows {it:?}"
            );
            let per = panels.div_ceil(it.col_groups);
            assert!(
                it.col_groups * per >= panels && (it.col_groups - 1) * per < panels,
                "{panels}: {it:?}"
            );
        }
        // The block5 shape at 224 px: whole-height items over column groups.
        assert_eq!(items::<MR, NR>(196, 32, 2, MC, true).row_blocks, 1);
        // A shared (256 x 4608 x 512): whole-height items, B packed once.
        assert_eq!(items::<MR, NR>(256, 32, 2, MC, true).row_blocks, 1);
        assert_eq!(items::<MR, NR>(3136, 16, 1, MC, false).col_groups, 1);
    }
}
