//! Winograd F(4x4, 3x3) on every ISA this CPU runs, against the nested-loop
//! f64 reference: sides that are and are not multiples of 4 (partial tiles
//! clipped at the edge), one-pixel images, many tiles over several chunks,
//! Cin over one reduction chunk, Cout not a multiple of the panel width,
//! with and without bias and ReLU; outputs pre-filled with NaN so an
//! unwritten element fails. On AVX2 and AVX-512, Cin a multiple of 8 takes the
//! micro-panel layout of V (`gemm_packed_a`), other Cin the row-pointer
//! GEMM: both occur in every test. An ISA the CPU lacks is reported SKIPPED.

mod common;
use common::*;
use ndarray::{Array1, Array2};
use rand::Rng;
use vgg16_cpu::tensor::conv::{conv3x3_forward_path, conv3x3_forward_prepared, ConvPath, PreparedKernel};
use vgg16_cpu::tensor::dispatch::Isa;
use vgg16_cpu::tensor::ops::maxpool2x2_infer;
use vgg16_cpu::tensor::winograd::{
    chunk_tiles, conv3x3_winograd_dw, conv3x3_winograd_scheduled, WinogradKernel, WinogradSchedule, CHUNK_BYTES,
};

fn check(isa: Isa, seed: u64, (n, h, w, cin, cout): (usize, usize, usize, usize, usize), relu: bool) -> f64 {
    let mut r = rng(seed);
    let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
    let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
    let b = rand1(&mut r, cout, -0.5, 0.5);
    let want = ref_conv(&to64_4(x.view()), &to64_4(k.view()), Some(&b.mapv(|v| v as f64)), relu);
    let mut out = Array2::<f32>::from_elem((n * h * w, cout), f32::NAN);
    conv3x3_forward_path(
        ConvPath::Winograd(isa),
        x.view(),
        k.view(),
        Some(b.view()),
        relu,
        out.view_mut(),
    );
    let e = rel_err(out.iter(), want.iter());
    assert!(
        e <= tol::WINOGRAD_FORWARD,
        "winograd {} n={n} h={h} w={w} cin={cin} cout={cout} relu={relu}: error {e}",
        isa.name()
    );
    e
}

#[test]
fn winograd_matches_reference_on_edge_shapes() {
    for isa in isas_or_skip("winograd_matches_reference_on_edge_shapes") {
        let mut worst = 0.0f64;
        for (i, &shape) in [
            (1, 1, 1, 16, 1),     // one pixel: a tile that is almost all padding
            (1, 5, 5, 16, 16),    // 2x2 tiles, the second ones clipped to one pixel
            (2, 8, 8, 32, 33),    // whole tiles; a 1-column tail panel
            (1, 14, 14, 64, 64),  // block5 at 224 px: 4x4 tiles, the last clipped to 2
            (3, 7, 9, 130, 70),   // Cin over one reduction chunk (128 + 2)
            (1, 6, 13, 20, 5),    // Cout below one vector
            (2, 12, 4, 17, 48),   // one side exactly one tile wide
            (1, 28, 28, 256, 40), // many tiles, a wide reduction
        ]
        .iter()
        .enumerate()
        {
            worst = worst.max(check(isa, 700 + i as u64, shape, i % 2 == 0));
        }
        eprintln!("winograd {}: worst relative error {worst:.2e}", isa.name());
    }
}

/// 25 random shapes: batch 1-3, sides 1-20, Cin 16-150, Cout 1-80.
#[test]
fn winograd_matches_reference_on_random_shapes() {
    for isa in isas_or_skip("winograd_matches_reference_on_random_shapes") {
        let mut r = rng(71);
        for i in 0..25 {
            let shape = (
                r.gen_range(1..=3),
                r.gen_range(1..=20),
                r.gen_range(1..=20),
                r.gen_range(16..=150),
                r.gen_range(1..=80),
            );
            let relu = r.gen_bool(0.5);
            check(isa, 800 + i, shape, relu);
        }
    }
}

/// More tiles than one chunk holds: the chunk loop, and bias-free calls.
#[test]
fn winograd_spans_several_chunks() {
    for isa in isas_or_skip("winograd_spans_several_chunks") {
        // U over FUSED_U_BYTES: the chunked schedule.
        let (cin, cout) = (64, 160);
        assert_eq!(WinogradSchedule::of(cin, cout), WinogradSchedule::Chunked);
        // Tiles of one chunk at this width, then a batch that needs ~2.5.
        let per_chunk = CHUNK_BYTES / (36 * (cin + cout) * 4);
        let n = (per_chunk * 5 / 2).div_ceil(16); // 16 tiles an image at 16x16
        let chunk = chunk_tiles(n * 16, cin, cout, 6);
        assert!(
            n * 16 > 2 * chunk,
            "{n} images make {} tiles, chunks of {chunk}",
            n * 16
        );
        let mut r = rng(72);
        let x = rand4(&mut r, (n, 16, 16, cin), -1.0, 1.0);
        let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
        let want = ref_conv(&to64_4(x.view()), &to64_4(k.view()), None, false);
        let p = PreparedKernel::new(ConvPath::Winograd(isa), k.view()).unwrap();
        assert_eq!(p.path(), ConvPath::Winograd(isa));
        let got = conv3x3_forward_prepared(x.view(), &p, None, false);
        let e = rel_err(got.iter(), want.iter());
        assert!(e <= tol::WINOGRAD_FORWARD, "{} n={n}: error {e}", isa.name());
        // The same kernel again gives the same bits (prepared once, reused).
        let again = conv3x3_forward_prepared(x.view(), &p, Some(Array1::zeros(cout).view()), false);
        assert!(got.iter().zip(again.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

/// The fused schedule (a dozen tiles a job through all three phases) and
/// the chunked one give the same bits, and both match the reference: many
/// jobs with a short last one, partial tiles, a tail panel, Cin not a
/// multiple of 8 (where both run chunked), bias and ReLU.
#[test]
fn winograd_fused_and_chunked_schedules_agree() {
    assert_eq!(WinogradSchedule::of(64, 64), WinogradSchedule::Fused);
    assert_eq!(WinogradSchedule::of(64, 128), WinogradSchedule::Fused);
    assert_eq!(WinogradSchedule::of(128, 128), WinogradSchedule::Chunked);
    assert_eq!(WinogradSchedule::of(512, 512), WinogradSchedule::Chunked);
    for isa in isas_or_skip("winograd_fused_and_chunked_schedules_agree") {
        for (i, &(n, h, w, cin, cout)) in [
            (3, 21, 19, 64, 64), // 3 x 30 tiles: several jobs, the last short
            (1, 9, 7, 16, 24),   // 6 tiles: one job, padding rows
            (2, 14, 14, 64, 40), // a tail panel
            (1, 10, 10, 20, 16), // Cin not a multiple of 8
            (2, 32, 32, 64, 64), // 128 tiles
        ]
        .iter()
        .enumerate()
        {
            let mut r = rng(900 + i as u64);
            let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
            let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
            let b = rand1(&mut r, cout, -0.5, 0.5);
            let relu = i % 2 == 0;
            let want = ref_conv(&to64_4(x.view()), &to64_4(k.view()), Some(&b.mapv(|v| v as f64)), relu);
            let kernel = WinogradKernel::from_keras(isa, k.view());
            let run = |schedule| run_scheduled(&x, &kernel, &b, relu, schedule, false);
            let (fused, chunked) = (run(WinogradSchedule::Fused), run(WinogradSchedule::Chunked));
            let e = rel_err(fused.iter(), want.iter());
            assert!(e <= tol::WINOGRAD_FORWARD, "{} fused {i}: error {e}", isa.name());
            assert!(
                fused.iter().zip(&chunked).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} shape {i}: fused and chunked differ",
                isa.name()
            );
        }
    }
}

/// `conv3x3_winograd_scheduled` of `x` (n, h, w, cin) into an output
/// pre-filled with NaN (so an unwritten element shows): (n*h*w, cout), or
/// with `pool` (n*h/2*w/2, cout).
fn run_scheduled(
    x: &ndarray::Array4<f32>,
    kernel: &WinogradKernel,
    b: &Array1<f32>,
    relu: bool,
    schedule: WinogradSchedule,
    pool: bool,
) -> Vec<f32> {
    let (n, h, w, cin) = x.dim();
    let side = if pool { (h / 2) * (w / 2) } else { h * w };
    let mut out = vec![std::mem::MaybeUninit::new(f32::NAN); n * side * kernel.cout];
    conv3x3_winograd_scheduled(
        x.as_slice().unwrap(),
        (n, h, w, cin),
        kernel,
        Some(b.as_slice().unwrap()),
        relu,
        &mut out,
        schedule,
        pool,
    );
    // SAFETY: f32 from MaybeUninit<f32> initialised above.
    out.into_iter().map(|v| unsafe { v.assume_init() }).collect()
}

/// The conv fused with the 2x2 max-pool after it
/// (`conv3x3_winograd_pool2`) gives bit for bit the unfused conv's output
/// pooled by `maxpool2x2_infer`, on every ISA and both schedules, and
/// writes every pooled pixel: partial tiles (sides 2 or 6 mod 4), one tile,
/// odd pooled widths, a channel tail (Cout not a multiple of 8), Cin not a
/// multiple of 8 (the row-pointer GEMM), several chunks, with and without
/// ReLU (the pool then sees negative values).
#[test]
fn winograd_pool2_equals_conv_then_pool() {
    for isa in isas_or_skip("winograd_pool2_equals_conv_then_pool") {
        for (i, &(n, h, w, cin, cout)) in [
            (1, 2, 2, 16, 16),
            (2, 6, 10, 16, 33),
            (1, 14, 14, 64, 64),
            (3, 8, 12, 20, 40),
            (2, 22, 18, 64, 70),
            (1, 4, 30, 24, 7),
        ]
        .iter()
        .enumerate()
        {
            let mut r = rng(1300 + i as u64);
            let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
            let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
            let b = rand1(&mut r, cout, -0.5, 0.5);
            let relu = i % 2 == 0;
            let kernel = WinogradKernel::from_keras(isa, k.view());
            for schedule in [WinogradSchedule::Fused, WinogradSchedule::Chunked] {
                let run = |pool| run_scheduled(&x, &kernel, &b, relu, schedule, pool);
                let full = ndarray::Array4::from_shape_vec((n, h, w, cout), run(false)).unwrap();
                let want = maxpool2x2_infer(full.view());
                let got = run(true);
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{} {schedule:?} shape {i}: unwritten pooled output",
                    isa.name()
                );
                assert!(
                    got.iter().zip(want.iter()).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} {schedule:?} shape {i}: fused conv + pool differs",
                    isa.name()
                );
            }
        }
    }
}

/// Chunks cover all tiles in balanced, mr-aligned pieces.
#[test]
fn winograd_chunks_are_balanced() {
    for &(tiles, cin, cout) in &[
        (1, 16, 16),
        (256, 512, 512),
        (50176, 64, 64),
        (12544, 256, 256),
        (7, 3000, 20),
    ] {
        for mr in [6, 12] {
            let c = chunk_tiles(tiles, cin, cout, mr);
            let n = tiles.div_ceil(c);
            assert_eq!(c % mr, 0);
            // The last chunk is within mr of the others (per chunk, before alignment).
            assert!(
                tiles - (n - 1) * c + mr * n >= c.saturating_sub(mr * n),
                "{tiles} {cin} {cout}: {c}"
            );
        }
    }
    // block5 at 224 px, batch 16: one chunk, U read once.
    assert_eq!(chunk_tiles(256, 512, 512, 6), 258);
}

/// dW by F(4,3) against the f64 sum over pixels of x (shifted by the tap)
/// times dz, on edge shapes: partial tiles, several chunks, channel tails.
#[test]
fn winograd_weight_gradient_matches_reference() {
    for isa in isas_or_skip("winograd_weight_gradient_matches_reference") {
        for (i, &(n, h, w, cin, cout)) in [
            (1, 5, 5, 16, 8),
            (2, 14, 14, 24, 17),
            (3, 7, 9, 9, 33),
            (1, 1, 3, 16, 16),
            (2, 16, 12, 64, 40),
            // 430 images of 16 tiles: more than two chunks at 16 -> 16.
            (430, 16, 16, 16, 16),
        ]
        .iter()
        .enumerate()
        {
            let mut r = rng(900 + i as u64);
            let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
            let dz = rand4(&mut r, (n, h, w, cout), -1.0, 1.0);
            let got = conv3x3_winograd_dw(isa, x.as_slice().unwrap(), (n, h, w, cin), dz.as_slice().unwrap(), cout);
            let mut want = vec![0.0f64; 9 * cin * cout];
            for img in 0..n {
                for y in 0..h {
                    for xx in 0..w {
                        for t in 0..9 {
                            let (iy, ix) = (y as isize + t as isize / 3 - 1, xx as isize + t as isize % 3 - 1);
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            for ci in 0..cin {
                                let xv = x[[img, iy as usize, ix as usize, ci]] as f64;
                                for co in 0..cout {
                                    want[(t * cin + ci) * cout + co] += xv * dz[[img, y, xx, co]] as f64;
                                }
                            }
                        }
                    }
                }
            }
            if n == 430 {
                assert!(n * 16 > 2 * chunk_tiles(n * 16, cin, cout, 1), "one chunk only");
            }
            let e = rel_err(got.iter(), want.iter());
            assert!(
                e <= tol::WINOGRAD_FORWARD,
                "winograd dW {} {:?}: error {e}",
                isa.name(),
                (n, h, w, cin, cout)
            );
        }
    }
}

/// V and M (and dW's V and dM) are kept by the calling thread from call
/// to call: a call after a larger one whose buffers hold NaN (from a NaN
/// input) gives, bit for bit, what a fresh thread gives, forward and dW,
/// on tile counts that leave padding rows in the last micro-panel block.
#[test]
fn kept_scratch_gives_what_a_fresh_thread_gives() {
    for isa in isas_or_skip("kept_scratch_gives_what_a_fresh_thread_gives") {
        let mut r = rng(4242);
        let (n, h, w, cin, cout) = (1, 9, 7, 16, 24); // 3 x 2 = 6 tiles
        let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
        let x5 = rand4(&mut r, (5, 5, 5, cin), -1.0, 1.0); // 5 x 4 = 20 tiles
        let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
        let dz = rand4(&mut r, (5, 5, 5, cout), -1.0, 1.0);
        let run = |x: &ndarray::Array4<f32>| {
            let (n, h, w, _) = x.dim();
            let mut out = Array2::<f32>::from_elem((n * h * w, cout), f32::NAN);
            conv3x3_forward_path(ConvPath::Winograd(isa), x.view(), k.view(), None, false, out.view_mut());
            out
        };
        let dw = |x: &ndarray::Array4<f32>| {
            let (n, h, w, _) = x.dim();
            conv3x3_winograd_dw(isa, x.as_slice().unwrap(), (n, h, w, cin), dz.as_slice().unwrap(), cout)
        };
        let fresh = std::thread::scope(|s| s.spawn(|| (run(&x), run(&x5), dw(&x5))).join().unwrap());
        let kept = std::thread::scope(|s| {
            s.spawn(|| {
                // Poison this thread's buffers: a big NaN input first.
                let nan = ndarray::Array4::<f32>::from_elem((6, 12, 12, cin), f32::NAN);
                let poisoned = run(&nan);
                assert!(poisoned.iter().all(|v| v.is_nan()));
                let dz_nan = ndarray::Array4::<f32>::from_elem((6, 12, 12, cout), f32::NAN);
                let _ = conv3x3_winograd_dw(
                    isa,
                    nan.as_slice().unwrap(),
                    (6, 12, 12, cin),
                    dz_nan.as_slice().unwrap(),
                    cout,
                );
                (run(&x), run(&x5), dw(&x5))
            })
            .join()
            .unwrap()
        });
        let same =
            |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same(fresh.0.as_slice().unwrap(), kept.0.as_slice().unwrap()),
            "{}: forward, 6 tiles",
            isa.name()
        );
        assert!(
            same(fresh.1.as_slice().unwrap(), kept.1.as_slice().unwrap()),
            "{}: forward, 20 tiles",
            isa.name()
        );
        assert!(same(&fresh.2, &kept.2), "{}: dW", isa.name());
    }
}
