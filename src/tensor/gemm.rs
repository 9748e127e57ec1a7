//! SGEMM entry point and threading policy.
//!
//! `C (m, n) = A (m, k) x B (k, n)`, or `C += A x B` with `accumulate`.
//!
//! Threading: C is cut into tiles whose sizes depend only on the problem
//! shape (never on the thread count). Each tile is one single-threaded call
//! of the backend, and the tiles are spread over rayon's pool. A tile's
//! result therefore does not depend on which thread computed it or how many
//! threads there are: outputs are bit-identical for any `--threads`.
//!
//! Backends:
//! - [`Backend::OwnAvx2`]: ours (`sgemm.rs`, BLIS's loop nest on a 6 x 16
//!   AVX2 + FMA micro-kernel). The default on AVX2 machines: measured
//!   against OpenBLAS in BENCHMARKS.md 7.3.
//! - [`Backend::OwnAvx512`]: the same loop nest on a 12 x 32 AVX-512
//!   micro-kernel (24 zmm sums, as the direct conv kernel). Not the default:
//!   on Zen 5 it measured 0.90-1.14x OpenBLAS over two sittings where the
//!   `gemm` crate measured 0.95-1.45x (BENCHMARKS.md 16.2, 16.5); kept for
//!   `vgg16 bench gemm` and as the start of a tuned one.
//! - [`Backend::OwnGeneric`]: the same in plain Rust, for any target.
//! - [`Backend::Gemm`]: the `gemm` crate (AVX-512 / AVX2 / NEON kernels with
//!   runtime CPU detection). The default on AVX-512 (its 16-wide kernels),
//!   without AVX2, and when `VGG16_ISA=generic` forces the portable path.
//! - [`Backend::Matrixmultiply`]: bluss's `matrixmultiply`, the portable
//!   baseline.
//!
//! All are tested against a naive GEMM (`tests/gemm.rs`) and appear in
//! `cargo bench --bench gemm` and `vgg16 bench gemm`, so a user can see which
//! is faster on their own server.

use crate::tensor::dispatch::{Dispatch, Isa};
use crate::tensor::sgemm::{self, Mat};
use ndarray::{ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// Which single-threaded kernel computes each tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Ours, on the AVX2 + FMA micro-kernel.
    OwnAvx2,
    /// Ours, on the AVX-512 12 x 32 micro-kernel.
    OwnAvx512,
    /// Ours, on the plain-Rust micro-kernel.
    OwnGeneric,
    /// The `gemm` crate (runtime-dispatched AVX-512/AVX2 micro-kernels).
    Gemm,
    /// The `matrixmultiply` crate (portable BLIS-style kernels).
    Matrixmultiply,
}

impl Backend {
    /// Every backend, in the order benches list them.
    pub const ALL: [Backend; 5] = [
        Backend::OwnAvx512,
        Backend::OwnAvx2,
        Backend::OwnGeneric,
        Backend::Gemm,
        Backend::Matrixmultiply,
    ];

    /// The backends this CPU can run (tests and benches take each).
    pub fn available() -> Vec<Backend> {
        Backend::ALL.into_iter().filter(|b| b.supported()).collect()
    }

    /// True when this CPU can run `self`.
    pub fn supported(self) -> bool {
        match self {
            Backend::OwnAvx2 => Isa::Avx2.supported(),
            Backend::OwnAvx512 => Isa::Avx512.supported(),
            Backend::OwnGeneric | Backend::Gemm | Backend::Matrixmultiply => true,
        }
    }

    /// The backend used when none is named, for this process's dispatch
    /// (`VGG16_ISA`): [`Dispatch::gemm_backend`].
    pub fn auto() -> Backend {
        Dispatch::global().gemm_backend()
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::OwnAvx2 => "own-avx2",
            Backend::OwnAvx512 => "own-avx512",
            Backend::OwnGeneric => "own-generic",
            Backend::Gemm => "gemm",
            Backend::Matrixmultiply => "matrixmultiply",
        }
    }

    pub fn from_name(s: &str) -> Option<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == s)
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend::auto()
    }
}

/// Below this many multiply-adds a product runs as one tile on the calling
/// thread: splitting costs more than it saves.
const SERIAL_MACS: usize = 1 << 18;
/// Tiles we aim for, so two to four threads stay busy (a property of the
/// shape, not of the pool).
const TARGET_TILES: usize = 4;
/// Smallest tile height (rows of C) worth a call of its own.
const MIN_TILE_M: usize = 128;
/// Widest tile (columns of C): wider B panels stop fitting in L2.
const MAX_TILE_N: usize = 512;
/// Narrowest tile worth a call of its own.
const MIN_TILE_N: usize = 64;
/// Tallest tile: keeps the packed A panel reusable across the tile's width.
const MAX_TILE_M: usize = 1024;

/// Tile sizes `(tm, tn)` for a product of this shape. Depends on the shape
/// only, which is what makes results independent of the thread count.
pub fn tile_shape(m: usize, k: usize, n: usize) -> (usize, usize) {
    if m == 0 || n == 0 || m.saturating_mul(k).saturating_mul(n) <= SERIAL_MACS {
        return (m.max(1), n.max(1));
    }
    // Among the splits with enough tiles, take the one whose tiles repack the
    // least: a (tm, tn) tile packs tm*k of A and k*tn of B for tm*tn*k MACs,
    // so the cost per MAC is 1/tn + 1/tm. Ties go to fewer column splits.
    let max_m_tiles = m.div_ceil(MIN_TILE_M).max(1);
    let max_n_tiles = n.div_ceil(MIN_TILE_N).max(1);
    let mut best: Option<(f64, usize, usize)> = None;
    for n_tiles in 1..=max_n_tiles.min(TARGET_TILES) {
        let tn = n.div_ceil(n_tiles);
        if tn > MAX_TILE_N {
            continue;
        }
        let m_tiles = m
            .div_ceil(MAX_TILE_M)
            .max(TARGET_TILES.div_ceil(n_tiles))
            .min(max_m_tiles)
            .max(1);
        let tm = m.div_ceil(m_tiles);
        let enough = m.div_ceil(tm) * n.div_ceil(tn) >= TARGET_TILES;
        let cost = 1.0 / tn as f64 + 1.0 / tm as f64 + if enough { 0.0 } else { 1.0 };
        if best.is_none_or(|(c, _, _)| cost < c) {
            best = Some((cost, tm, tn));
        }
    }
    match best {
        Some((_, tm, tn)) => (tm, tn),
        None => (m.div_ceil(m.div_ceil(MAX_TILE_M)), MAX_TILE_N.min(n)),
    }
}

/// `C = A x B` (or `C += A x B` when `accumulate`) with [`Backend::auto`].
///
/// Shapes: `a` (m, k), `b` (k, n), `c` (m, n); any strides (a transposed
/// view is fine). With `accumulate == false`, C is never read, so it may
/// hold garbage (even NaN).
pub fn sgemm(a: ArrayView2<f32>, b: ArrayView2<f32>, c: ArrayViewMut2<f32>, accumulate: bool) {
    sgemm_with(Backend::auto(), a, b, c, accumulate)
}

/// [`sgemm`] with a chosen backend.
pub fn sgemm_with(
    backend: Backend,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    mut c: ArrayViewMut2<f32>,
    accumulate: bool,
) {
    let Some((m, k, n)) = check_and_trivial(&a, &b, &mut c, accumulate) else {
        return;
    };
    if matches!(backend, Backend::OwnAvx512 | Backend::OwnAvx2 | Backend::OwnGeneric) {
        // Ours threads itself (B packed once for all threads).
        let parallel = m.saturating_mul(k).saturating_mul(n) > SERIAL_MACS;
        own(backend, a, b, c, accumulate, parallel);
        return;
    }
    let (tm, tn) = tile_shape(m, k, n);
    if tm >= m && tn >= n {
        sgemm_serial(backend, a, b, c, accumulate);
        return;
    }
    // LOOP over C tiles: rows in tm parts, columns in tn parts; each tile is
    // one single-threaded backend call over the full k.
    let tiles = split_tiles(c, tm, tn);
    tiles.into_par_iter().for_each(|(i0, j0, tile)| {
        let (h, w) = tile.dim();
        let a_t = a.slice(ndarray::s![i0..i0 + h, ..]);
        let b_t = b.slice(ndarray::s![.., j0..j0 + w]);
        sgemm_serial(backend, a_t, b_t, tile, accumulate);
    });
}

/// Cuts a matrix into disjoint (tm, tn) tiles, row-major order, each with
/// the (row, column) of its first element. The last row/column of tiles may
/// be smaller.
pub fn split_tiles(c: ArrayViewMut2<f32>, tm: usize, tn: usize) -> Vec<(usize, usize, ArrayViewMut2<f32>)> {
    assert!(tm > 0 && tn > 0, "split_tiles: tile sizes must be positive");
    let mut tiles = Vec::new();
    let mut rest_rows = c;
    let mut i0 = 0;
    while rest_rows.nrows() > 0 {
        let h = tm.min(rest_rows.nrows());
        let (mut band, next) = rest_rows.split_at(Axis(0), h);
        rest_rows = next;
        let mut j0 = 0;
        while band.ncols() > 0 {
            let w = tn.min(band.ncols());
            let (tile, next) = band.split_at(Axis(1), w);
            band = next;
            tiles.push((i0, j0, tile));
            j0 += w;
        }
        i0 += h;
    }
    tiles
}

/// Checks the shapes; handles empty products (C untouched, or zeroed when
/// k = 0 without accumulate). Returns (m, k, n) when there is work to do.
fn check_and_trivial(
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    c: &mut ArrayViewMut2<f32>,
    accumulate: bool,
) -> Option<(usize, usize, usize)> {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert_eq!(k, k2, "sgemm: A is {m}x{k} but B is {k2}x{n}");
    assert_eq!(c.dim(), (m, n), "sgemm: C must be {m}x{n}, is {:?}", c.dim());
    if m == 0 || n == 0 {
        return None;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return None;
    }
    Some((m, k, n))
}

/// One single-threaded backend call: `C (m, n) (+)= A (m, k) x B (k, n)`.
pub fn sgemm_serial(
    backend: Backend,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    mut c: ArrayViewMut2<f32>,
    accumulate: bool,
) {
    let Some((m, k, n)) = check_and_trivial(&a, &b, &mut c, accumulate) else {
        return;
    };
    let (rsa, csa) = (a.strides()[0], a.strides()[1]);
    let (rsb, csb) = (b.strides()[0], b.strides()[1]);
    let (rsc, csc) = (c.strides()[0], c.strides()[1]);
    let (pa, pb, pc) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    // SAFETY: the pointers and strides come from live ndarray views of the
    // stated shapes; `c` is borrowed mutably, so nothing else aliases it, and
    // a view with distinct elements never has a zero stride on a dimension
    // longer than one.
    unsafe {
        match backend {
            Backend::OwnAvx512 | Backend::OwnAvx2 | Backend::OwnGeneric => own(backend, a, b, c, accumulate, false),
            Backend::Matrixmultiply => matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                pa,
                rsa,
                csa,
                pb,
                rsb,
                csb,
                if accumulate { 1.0 } else { 0.0 },
                pc,
                rsc,
                csc,
            ),
            // gemm's convention: dst := alpha*dst + beta*lhs*rhs, and dst is
            // not read when read_dst is false.
            Backend::Gemm => gemm::gemm(
                m,
                n,
                k,
                pc,
                csc,
                rsc,
                accumulate,
                pa,
                csa,
                rsa,
                pb,
                csb,
                rsb,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            ),
        }
    }
}

/// Our SGEMM (`sgemm.rs`) on ndarray views, threaded or not.
fn own(
    backend: Backend,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    c: ArrayViewMut2<f32>,
    accumulate: bool,
    parallel: bool,
) {
    let isa = match backend {
        Backend::OwnAvx512 => Isa::Avx512,
        Backend::OwnAvx2 => Isa::Avx2,
        _ => Isa::Generic,
    };
    let mat = |v: &ArrayView2<f32>| Mat {
        ptr: v.as_ptr(),
        rs: v.strides()[0],
        cs: v.strides()[1],
    };
    // SAFETY: `a` and `b` are live views of the shapes `check_and_trivial`
    // checked, borrowed for the call, so nobody writes them meanwhile.
    unsafe { sgemm::sgemm(isa, a.ncols(), mat(&a), mat(&b), c, accumulate, parallel) }
}

/// FLOPs of one product (2 per multiply-add), for GFLOP/s figures.
pub fn flops(m: usize, k: usize, n: usize) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_and_ignore_threads() {
        for &(m, k, n) in &[(196, 4608, 512), (65536, 576, 64), (7, 3, 5), (3136, 2304, 256)] {
            let (tm, tn) = tile_shape(m, k, n);
            assert!(tm >= 1 && tn >= 1 && tm <= m.max(1) && tn <= n.max(1));
        }
    }
}
