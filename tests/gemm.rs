//! SGEMM against a naive reference, for every backend, on odd and edge shapes.

mod common;
use common::*;
use ndarray::{s, Array2};
use vgg16_cpu::tensor::gemm::{sgemm_with, tile_shape, Backend};

/// Odd sizes 0..=20 in every dimension (matrixmultiply's habit), including
/// 0- and 1-sized ones, with integer inputs so the product is exact.
#[test]
fn exact_on_small_odd_shapes_every_backend() {
    let mut r = rng(1);
    let sizes = [0usize, 1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 20];
    for backend in Backend::available() {
        for &m in &sizes {
            for &k in &sizes {
                for &n in &[0usize, 1, 3, 7, 16, 17] {
                    let a = rand_int2(&mut r, (m, k), -4, 4);
                    let b = rand_int2(&mut r, (k, n), -4, 4);
                    let want = ref_gemm(a.view(), b.view());
                    // C pre-filled with NaN: accumulate=false must never read it.
                    let mut c = Array2::from_elem((m, n), f32::NAN);
                    sgemm_with(backend, a.view(), b.view(), c.view_mut(), false);
                    for (x, y) in c.iter().zip(want.iter()) {
                        assert_eq!(*x as f64, *y, "{backend:?} {m}x{k}x{n}");
                    }
                }
            }
        }
    }
}

/// Shapes big enough to be cut into tiles (so the parallel path runs),
/// including awkward remainders and the 17x257 of matrixmultiply's tests.
#[test]
fn tiled_shapes_match_reference_every_backend() {
    let mut r = rng(2);
    let shapes = [
        (17, 257, 17),
        (257, 17, 257),
        (1000, 33, 300),
        (129, 577, 65),
        (196, 300, 513),
        (3, 2000, 700),
    ];
    for backend in Backend::available() {
        for &(m, k, n) in &shapes {
            let (tm, tn) = tile_shape(m, k, n);
            let a = rand2(&mut r, (m, k), -1.0, 1.0);
            let b = rand2(&mut r, (k, n), -1.0, 1.0);
            let want = ref_gemm(a.view(), b.view());
            let mut c = Array2::from_elem((m, n), f32::NAN);
            sgemm_with(backend, a.view(), b.view(), c.view_mut(), false);
            let e = rel_err(c.iter(), want.iter());
            assert!(
                e <= tol::F32_FORWARD,
                "{backend:?} {m}x{k}x{n} (tiles {tm}x{tn}): error {e}"
            );
        }
    }
}

/// Identity times B is B exactly; accumulate adds to what C held.
#[test]
fn identity_and_accumulate() {
    let mut r = rng(3);
    for backend in Backend::available() {
        let n = 300;
        let eye = Array2::<f32>::eye(n);
        let b = rand2(&mut r, (n, 70), -1.0, 1.0);
        let mut c = Array2::from_elem((n, 70), f32::NAN);
        sgemm_with(backend, eye.view(), b.view(), c.view_mut(), false);
        assert_eq!(c, b, "{backend:?}: I x B != B");
        let mut c2 = b.clone();
        sgemm_with(backend, eye.view(), b.view(), c2.view_mut(), true);
        assert_eq!(c2, &b * 2.0, "{backend:?}: B + I x B != 2B");
    }
}

/// Transposed and strided views (the backward pass multiplies by col^T and
/// W^T, and writes into column slices).
#[test]
fn transposed_and_strided_views() {
    let mut r = rng(4);
    for backend in Backend::available() {
        let at = rand2(&mut r, (600, 150), -1.0, 1.0); // A = at^T: (150, 600)
        let b = rand2(&mut r, (600, 90), -1.0, 1.0);
        let want = ref_gemm(at.t(), b.view());
        let mut big = Array2::from_elem((150, 200), f32::NAN);
        sgemm_with(backend, at.t(), b.view(), big.slice_mut(s![.., 50..140]), false);
        let got = big.slice(s![.., 50..140]).to_owned();
        let e = rel_err(got.iter(), want.iter());
        assert!(e <= tol::F32_FORWARD, "{backend:?}: transposed A error {e}");
        assert!(
            big.slice(s![.., ..50]).iter().all(|v| v.is_nan()),
            "{backend:?} wrote outside C"
        );
        assert!(
            big.slice(s![.., 140..]).iter().all(|v| v.is_nan()),
            "{backend:?} wrote outside C"
        );
    }
}

/// k = 0: C = 0 without accumulate, unchanged with it.
#[test]
fn empty_inner_dimension() {
    for backend in Backend::available() {
        let a = Array2::<f32>::zeros((4, 0));
        let b = Array2::<f32>::zeros((0, 3));
        let mut c = Array2::from_elem((4, 3), f32::NAN);
        sgemm_with(backend, a.view(), b.view(), c.view_mut(), false);
        assert!(c.iter().all(|&v| v == 0.0));
        let mut c = Array2::from_elem((4, 3), 2.5f32);
        sgemm_with(backend, a.view(), b.view(), c.view_mut(), true);
        assert!(c.iter().all(|&v| v == 2.5));
    }
}

/// The tiles the parallel GEMM hands out cover every element of C exactly
/// once (NaN-filled outputs would catch a gap, not a double write).
#[test]
fn tiles_cover_the_output_exactly_once() {
    for &(m, k, n) in &[
        (17, 257, 17),
        (1000, 33, 300),
        (196, 300, 513),
        (3, 2000, 700),
        (50176, 576, 64),
    ] {
        let (tm, tn) = tile_shape(m, k, n);
        let mut c = Array2::<f32>::zeros((m, n));
        for (r0, c0, mut t) in vgg16_cpu::tensor::gemm::split_tiles(c.view_mut(), tm, tn) {
            assert!(r0 % tm == 0 && c0 % tn == 0, "{m}x{n}: tile at ({r0}, {c0})");
            t.mapv_inplace(|v| v + 1.0);
        }
        assert!(
            c.iter().all(|&v| v == 1.0),
            "{m}x{k}x{n}: tiles {tm}x{tn} do not cover C exactly once"
        );
    }
}

/// Our backends' blocking edges: K across their 320- or 256-long blocks
/// (with a tail that is not a whole group of 8) and packed runs of them,
/// rows across their row blocks (216, 384) and 6- or 12-row micro-panels,
/// columns past the 4096-wide B block and the 16- or 32-wide panels;
/// transposed A and B, a transposed (column-strided) C, accumulate. Each
/// against the naive GEMM, and the threaded call bit-identical to one
/// thread's (`sgemm_serial`).
#[test]
fn own_backend_blocking_edges() {
    use vgg16_cpu::tensor::gemm::sgemm_serial;
    let mut r = rng(5);
    let shapes = [
        (1, 1, 1),
        (7, 259, 33),
        (145, 513, 17),
        (290, 300, 40),
        (5, 20, 4113),
        (13, 8, 16),
        (61, 1025, 130),
        // B over the 4 Mi floats packed at once: two runs of K blocks.
        (13, 1100, 3900),
        // The 12 x 32 kernel: rows over its 384-row block (and 1 past a
        // micro-panel), K over two of its blocks with a tail of 91.
        (397, 603, 70),
        // A the shared operand (fewer rows than columns: packed up front
        // for every K block), cut into two row blocks on the 6 x 16 kernel.
        (400, 650, 900),
    ];
    for backend in [Backend::OwnAvx512, Backend::OwnAvx2, Backend::OwnGeneric] {
        if !backend.supported() {
            eprintln!("SKIPPED own_backend_blocking_edges on {backend:?}: this CPU cannot run it");
            continue;
        }
        for &(m, k, n) in &shapes {
            for (ta, tb, tc) in [
                (false, false, false),
                (true, true, false),
                (false, false, true),
                (true, false, true),
            ] {
                let a0 = rand2(&mut r, if ta { (k, m) } else { (m, k) }, -1.0, 1.0);
                let b0 = rand2(&mut r, if tb { (n, k) } else { (k, n) }, -1.0, 1.0);
                let (a, b) = (if ta { a0.t() } else { a0.view() }, if tb { b0.t() } else { b0.view() });
                let c0 = rand2(&mut r, (m, n), -1.0, 1.0);
                let mut want = ref_gemm(a, b);
                want.zip_mut_with(&c0, |w, &c| *w += c as f64);
                let mut store = if tc { c0.t().to_owned() } else { c0.clone() };
                let mut c = if tc {
                    store.view_mut().reversed_axes()
                } else {
                    store.view_mut()
                };
                sgemm_with(backend, a, b, c.view_mut(), true);
                let e = rel_err(c.iter(), want.iter());
                let case = format!("{backend:?} {m}x{k}x{n} ta {ta} tb {tb} tc {tc}");
                assert!(e <= tol::F32_FORWARD, "{case}: error {e}");
                let mut serial = Array2::from_elem((m, n), f32::NAN);
                sgemm_serial(backend, a, b, serial.view_mut(), false);
                let mut threaded = Array2::from_elem((m, n), f32::NAN);
                sgemm_with(backend, a, b, threaded.view_mut(), false);
                assert!(
                    serial
                        .iter()
                        .zip(threaded.iter())
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{case}: threaded differs from one thread"
                );
            }
        }
    }
}
