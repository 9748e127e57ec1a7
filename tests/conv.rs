//! Conv forward against a direct nested-loop convolution on random shapes.

mod common;
use common::*;
use ndarray::Array2;
use rand::seq::SliceRandom;
use rand::Rng;
use vgg16_cpu::tensor::conv::{conv3x3_forward, conv3x3_forward_path, ConvPlan};

fn check(seed: u64, n: usize, h: usize, w: usize, cin: usize, cout: usize, relu: bool) {
    let mut r = rng(seed);
    let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
    let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
    let b = rand1(&mut r, cout, -0.5, 0.5);
    let want = ref_conv(&to64_4(x.view()), &to64_4(k.view()), Some(&b.mapv(|v| v as f64)), relu);
    let got = conv3x3_forward(x.view(), k.view(), Some(b.view()), relu);
    assert_eq!(got.dim(), want.dim());
    let e = rel_err(got.iter(), want.iter());
    assert!(
        e <= tol::F32_FORWARD,
        "conv n={n} h={h} w={w} cin={cin} cout={cout} relu={relu} plan={:?}: error {e}",
        ConvPlan::new(n * h * w, cin, cout)
    );
    // Every path this CPU runs, whatever Auto picked (the direct kernel on
    // each supported ISA, im2col, tap classes for small images); output
    // pre-filled with NaN, so an unwritten element fails.
    for path in paths_or_skip("conv::check", h, w) {
        let mut out = Array2::<f32>::from_elem((n * h * w, cout), f32::NAN);
        conv3x3_forward_path(path, x.view(), k.view(), Some(b.view()), relu, out.view_mut());
        let e = rel_err(out.iter(), want.iter());
        assert!(
            e <= forward_tol(path),
            "{path:?} n={n} h={h} w={w} cin={cin} cout={cout}: error {e}"
        );
    }
}

/// 60 random draws from batch 1-3, H, W in {1,2,3,5,7,14,32},
/// Cin in {1,3,5,64}, Cout in {1,7,64}.
#[test]
fn forward_matches_direct_convolution_random_shapes() {
    let mut r = rng(10);
    let hw = [1usize, 2, 3, 5, 7, 14, 32];
    for i in 0..60 {
        let n = r.gen_range(1..=3);
        let h = *hw.choose(&mut r).unwrap();
        let w = *hw.choose(&mut r).unwrap();
        let cin = *[1usize, 3, 5, 64].choose(&mut r).unwrap();
        let cout = *[1usize, 7, 64].choose(&mut r).unwrap();
        check(100 + i, n, h, w, cin, cout, i % 2 == 0);
    }
}

/// The corners of that grid, deterministically, so the extremes always run.
#[test]
fn forward_matches_direct_convolution_corner_shapes() {
    for (i, &(n, h, w, cin, cout)) in [
        (1, 1, 1, 1, 1),
        (3, 32, 32, 64, 64),
        (1, 1, 32, 5, 7),
        (2, 32, 1, 3, 64),
        (3, 2, 2, 64, 1),
        (1, 14, 14, 64, 7),
        // Small images (tap classes): every side up to SMALL_SIDE.
        (2, 4, 4, 64, 7),
        (1, 4, 3, 5, 64),
        (3, 1, 4, 3, 1),
        (2, 4, 1, 64, 64),
        (1, 5, 4, 3, 7),
    ]
    .iter()
    .enumerate()
    {
        check(200 + i as u64, n, h, w, cin, cout, true);
    }
}

/// Shapes whose plan splits the output channels as well as the pixels
/// (few pixels, many channels: VGG-16's block5 at small sizes).
#[test]
fn forward_with_channel_split_plans() {
    let plan = ConvPlan::new(2 * 2 * 2, 130, 300);
    assert!(plan.couts < 300, "expected a channel split, got {plan:?}");
    check(300, 2, 2, 2, 130, 300, true);
    check(301, 1, 7, 7, 96, 200, false);
}
