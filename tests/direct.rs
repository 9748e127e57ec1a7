//! The direct conv kernel, on every ISA this CPU runs (AVX-512, AVX2 + FMA,
//! portable), against the nested-loop reference, on shapes that hit its
//! edges: pixel blocks straddling rows and images, the last partial block,
//! Cout not a multiple of the panel width, reduction chunks split inside a
//! tap (Cin > 128), taps dead for a whole block, channel-split plans, and the
//! RGB layer. An ISA the CPU lacks is reported SKIPPED by name.

mod common;
use common::*;
use ndarray::Array4;
use rand::Rng;
use vgg16_cpu::model::vgg::{Kind, BLOCK5_START, LAYERS};
use vgg16_cpu::tensor::conv::{conv3x3_forward, conv3x3_forward_path, ConvPath};
use vgg16_cpu::tensor::direct::{
    conv3x3_direct, conv3x3_direct_pool2, streams_output, DirectPlan, Geometry, PackedKernel,
};
use vgg16_cpu::tensor::dispatch::Isa;
use vgg16_cpu::tensor::dispatch::{ConvAlgo, Dispatch};
use vgg16_cpu::tensor::ops::{gap_forward, maxpool2x2_forward, maxpool2x2_infer};

fn run(path: ConvPath, x: &Array4<f32>, k: &Array4<f32>, b: &ndarray::Array1<f32>, relu: bool) -> Array4<f32> {
    let (n, h, w, _) = x.dim();
    let cout = k.dim().3;
    // Pre-filled with NaN: the kernel must write every output, never read.
    let mut out = Array4::<f32>::from_elem((n, h, w, cout), f32::NAN);
    let o2 = out.view_mut().into_shape_with_order((n * h * w, cout)).unwrap();
    conv3x3_forward_path(path, x.view(), k.view(), Some(b.view()), relu, o2);
    out
}

fn check(isa: Isa, seed: u64, (n, h, w, cin, cout): (usize, usize, usize, usize, usize), relu: bool) {
    let mut r = rng(seed);
    let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
    let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
    let b = rand1(&mut r, cout, -0.5, 0.5);
    let got = run(ConvPath::Direct(isa), &x, &k, &b, relu);
    let want = ref_conv(&to64_4(x.view()), &to64_4(k.view()), Some(&b.mapv(|v| v as f64)), relu);
    assert!(got.iter().all(|v| v.is_finite()), "unwritten output left NaN");
    let e = rel_err(got.iter(), want.iter());
    assert!(
        e <= tol::F32_FORWARD,
        "direct {} n={n} h={h} w={w} cin={cin} cout={cout} relu={relu} plan={:?}: error {e}",
        isa.name(),
        DirectPlan::new(isa, n * h * w, w, cin, cout)
    );
}

#[test]
fn direct_matches_reference_on_edge_shapes() {
    for isa in isas_or_skip("direct_matches_reference_on_edge_shapes") {
        edge_shapes(isa);
    }
}

fn edge_shapes(isa: Isa) {
    for (i, &shape) in [
        (1, 1, 1, 1, 1),      // one pixel, every tap but the centre dead
        (1, 5, 5, 3, 64),     // the RGB layer's channel count, forced
        (1, 6, 4, 15, 17),    // gathered rows (Cin < 16), Cout one past a panel
        (1, 2, 3, 8, 8),      // Cout below one AVX2 vector: every store masked
        (2, 7, 5, 16, 33),    // blocks straddle rows and images; 1-column tail panel
        (1, 12, 1, 20, 32),   // one column: the side taps are dead everywhere
        (1, 1, 13, 17, 31),   // one row: the top and bottom taps dead
        (3, 6, 6, 130, 70),   // Cin over one reduction chunk (130 = 128 + 2)
        (1, 9, 11, 300, 96),  // three chunks per tap, 3 whole panels
        (2, 14, 14, 64, 512), // block5-like: few pixels, many channels (split)
        (1, 3, 3, 64, 5),     // 9 pixels: a single partial block
        (4, 8, 8, 96, 128),
        // Rows of 14 (14-pixel blocks on AVX-512, one image row each), and
        // of 28-56 beside them (12-pixel blocks):
        (1, 3, 14, 130, 33), // chunks split in a tap, 1-column tail panel
        (2, 5, 14, 20, 64),  // top/bottom rows' dead taps skipped per block
        (2, 5, 28, 20, 64),
        (1, 1, 42, 16, 40), // one row: only the middle taps live
        (3, 4, 56, 17, 32),
    ]
    .iter()
    .enumerate()
    {
        check(isa, 500 + i as u64, shape, i % 2 == 0);
    }
}

/// The conv fused with the 2x2 max-pool after it gives bit for bit the
/// conv's output pooled, on every ISA, and writes every output: one row
/// pair, odd pooled widths, tail panels, split panel plans (few pixels),
/// several reduction chunks, the RGB layer's channel count, 14-pixel rows.
#[test]
fn direct_pool2_equals_conv_then_pool() {
    for isa in isas_or_skip("direct_pool2_equals_conv_then_pool") {
        for (i, &(n, h, w, cin, cout)) in [
            (1, 2, 2, 3, 5),
            (2, 4, 6, 16, 33),
            (1, 6, 10, 20, 64),
            (2, 14, 14, 64, 512),
            (3, 8, 8, 130, 70),
            (2, 28, 28, 20, 64),
            (1, 10, 12, 3, 64),
            (4, 2, 30, 17, 31),
        ]
        .iter()
        .enumerate()
        {
            let mut r = rng(700 + i as u64);
            let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
            let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
            let b = rand1(&mut r, cout, -0.5, 0.5);
            let full = run(ConvPath::Direct(isa), &x, &k, &b, true);
            let want = maxpool2x2_infer(full.view());
            let packed = PackedKernel::from_keras(isa, k.view());
            let mut out = vec![std::mem::MaybeUninit::new(f32::NAN); n * h / 2 * w / 2 * cout];
            conv3x3_direct_pool2(
                x.as_slice().unwrap(),
                (n, h, w, cin),
                &packed,
                b.as_slice(),
                true,
                &mut out,
            );
            // SAFETY: initialised with NaN, then written.
            let got: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert!(
                got.iter().all(|v| v.is_finite()),
                "{isa:?} {:?}: unwritten output",
                (n, h, w, cin, cout)
            );
            let same = got.iter().zip(want.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{isa:?} {:?}: fused conv + pool differs (plan {:?})",
                (n, h, w, cin, cout),
                DirectPlan::pooled(isa, n * h * w, w, cin, cout)
            );
        }
    }
}

/// Pooled plans cut whole row pairs: every job starts on an even row.
#[test]
fn pooled_plans_cover_row_pairs() {
    for isa in Isa::ALL {
        for &(m, w) in &[
            (16 * 224 * 224, 224),
            (16 * 28 * 28, 28),
            (16 * 14 * 14, 14),
            (4, 2),
            (64 * 4, 2),
            (6 * 30, 30),
        ] {
            let p = DirectPlan::pooled(isa, m, w, 64, 64);
            assert!(
                p.pixels > 0 && p.pixels.is_multiple_of(2 * w),
                "{isa:?} m={m} w={w}: {p:?}"
            );
        }
    }
}

/// The whole base on the direct kernel and on Winograd, every ISA: a pass
/// that fuses each conv with the pool after it (`features`,
/// `forward_layers` keeping nothing) gives bit for bit the pass that keeps
/// every layer's output, and taps the fused convs' outputs not at all.
#[test]
fn fused_pass_matches_unfused() {
    let model = fake_vgg(56);
    let mut r = rng(57);
    for (isa, conv) in isas_or_skip("fused_pass_matches_unfused")
        .into_iter()
        .flat_map(|isa| [(isa, ConvAlgo::Direct), (isa, ConvAlgo::Winograd)])
    {
        let net = model.prepare_with(Dispatch { isa, conv });
        for &(n, s) in &[(2usize, 64usize), (1, 32), (2, 28)] {
            let x = rand4(&mut r, (n, s, s, 3), -100.0, 100.0);
            let mut all = Vec::new();
            let want = net.forward_range(x.clone(), 0..LAYERS.len(), &mut |i, a| all.push((i, a.to_owned())));
            let mut seen = Vec::new();
            let got = net.forward_layers(x.clone(), 0..LAYERS.len(), &|_| false, &mut |i, a| {
                seen.push((i, a.to_owned()))
            });
            assert_eq!(got.dim(), want.dim());
            assert!(
                got.iter().zip(want.iter()).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?} {conv:?} {s} px"
            );
            for (i, a) in &seen {
                let (_, w) = &all[*i];
                assert!(
                    a.iter().zip(w.iter()).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{isa:?} {conv:?} {s} px layer {i}"
                );
            }
            // At least block1 and block2 fuse at every size here (at 28 px
            // block3 sees 7 x 7, odd, and runs unfused).
            let fused = LAYERS.len() - seen.len();
            assert!(fused >= 2, "{isa:?} {conv:?} {s} px: only {fused} layers fused");
            let feats = net.features(x);
            let gap = gap_forward(want.view());
            assert!(
                feats.iter().zip(gap.iter()).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?} {conv:?} {s} px features"
            );
        }
    }
}

/// The RGB layer's streaming stores (an output past 128 MB, rows on 64
/// bytes) write what plain stores write, bit for bit: the same output
/// written once from a 64-byte boundary (streamed) and once 4 bytes past
/// it (plain stores), and both against the nested-loop reference on a
/// sample of pixels, edges included.
#[test]
fn rgb_layer_streamed_equals_plain_stores() {
    let isas: Vec<Isa> = isas_or_skip("rgb_layer_streamed_equals_plain_stores")
        .into_iter()
        .filter(|&i| i != Isa::Generic)
        .collect();
    if isas.is_empty() {
        eprintln!("SKIPPED rgb_layer_streamed_equals_plain_stores: no SIMD kernel on this CPU");
    }
    let (n, h, w, cin, cout) = (3, 480, 480, 3, 64);
    let mut r = rng(54);
    let x = rand4(&mut r, (n, h, w, cin), -1.0, 1.0);
    let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
    let b = rand1(&mut r, cout, -0.5, 0.5);
    let len = n * h * w * cout;
    for isa in isas {
        let packed = PackedKernel::from_keras(isa, k.view());
        let mut buf = vec![std::mem::MaybeUninit::<f32>::new(f32::NAN); len + 32];
        let at = buf.as_ptr().align_offset(64);
        // The output at `off` in `buf`, and whether it was streamed.
        let mut run = |off: usize| -> (bool, Vec<f32>) {
            let out = &mut buf[off..off + len];
            out.fill(std::mem::MaybeUninit::new(f32::NAN));
            let streamed = streams_output(isa, cin, cout, out);
            conv3x3_direct(
                x.as_slice().unwrap(),
                (n, h, w, cin),
                &packed,
                Some(b.as_slice().unwrap()),
                true,
                out,
            );
            // SAFETY: initialised by the fill (and conv3x3_direct's writes).
            (streamed, out.iter().map(|e| unsafe { e.assume_init() }).collect())
        };
        let (s1, streamed) = run(at);
        let (s2, plain) = run(at + 1);
        assert!(s1 && !s2, "{isa:?}: only the aligned output should stream ({s1}, {s2})");
        assert!(streamed.iter().all(|v| v.is_finite()), "{isa:?}: unwritten output");
        assert!(
            streamed.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{isa:?}: streamed and plain stores differ"
        );
        // Pixels on every edge and inside, against the reference.
        for &(img, y, xx) in &[
            (0, 0, 0),
            (0, 0, 479),
            (1, 479, 0),
            (2, 479, 479),
            (1, 240, 17),
            (2, 1, 478),
        ] {
            for co in [0, 31, 63] {
                let mut want = b[co] as f64;
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) = (y + ky, xx + kx);
                        if iy < 1 || iy > h || ix < 1 || ix > w {
                            continue;
                        }
                        for c in 0..cin {
                            want += x[[img, iy - 1, ix - 1, c]] as f64 * k[[ky, kx, c, co]] as f64;
                        }
                    }
                }
                let got = streamed[((img * h + y) * w + xx) * cout + co] as f64;
                assert!(
                    (got - want.max(0.0)).abs() <= 1e-4,
                    "{isa:?} ({img}, {y}, {xx}, {co}): {got} vs {want}"
                );
            }
        }
    }
}

/// 40 random shapes: batch 1-3, sides 1-17, Cin 1-200, Cout 1-100.
#[test]
fn direct_matches_reference_on_random_shapes() {
    for isa in isas_or_skip("direct_matches_reference_on_random_shapes") {
        random_shapes(isa);
    }
}

fn random_shapes(isa: Isa) {
    let mut r = rng(51);
    for i in 0..40 {
        let shape = (
            r.gen_range(1..=3),
            r.gen_range(1..=17),
            r.gen_range(1..=17),
            r.gen_range(1..=200),
            r.gen_range(1..=100),
        );
        let relu = r.gen_bool(0.5);
        check(isa, 600 + i, shape, relu);
    }
}

/// Plans cut every layer into whole micro-kernel blocks, and the jobs they
/// imply (pixel runs x panel runs, as `conv3x3_direct` walks them) cover
/// every (pixel, panel) pair exactly once.
#[test]
fn direct_plans_tile_the_output() {
    for isa in Isa::ALL {
        for &(m, w, cin, cout) in &[
            (1, 1, 1, 1),
            (196, 14, 512, 512),
            (65536, 64, 64, 64),
            (12544, 28, 512, 512),
            (1000, 10, 3, 64),
            (50, 5, 200, 33),
        ] {
            let g = Geometry::direct(isa, w);
            let p = DirectPlan::new(isa, m, w, cin, cout);
            assert_eq!(p.pixels % g.mr, 0, "{isa:?} {p:?}");
            let panels = cout.div_ceil(g.nr);
            assert!(p.pixels >= g.mr && p.panels >= 1 && p.panels <= panels, "{isa:?} {p:?}");
            let mut seen = vec![0u8; m * panels];
            for pj in 0..m.div_ceil(p.pixels) {
                for cj in 0..panels.div_ceil(p.panels) {
                    for px in pj * p.pixels..((pj + 1) * p.pixels).min(m) {
                        for j in cj * p.panels..((cj + 1) * p.panels).min(panels) {
                            seen[px * panels + j] += 1;
                        }
                    }
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "{isa:?} {m} {w} {cin} {cout}: {p:?} does not tile"
            );
        }
        // Few pixels: the channel panels are split between jobs too.
        let nr = Geometry::of(isa).nr;
        assert!(DirectPlan::new(isa, 196, 14, 512, 512).panels < 512 / nr, "{isa:?}");
    }
}

#[test]
fn direct_and_im2col_agree_on_vgg_layers() {
    let isas = isas_or_skip("direct_and_im2col_agree_on_vgg_layers");
    let mut r = rng(52);
    for &(hw, cin, cout) in &[(32, 64, 64), (16, 128, 256), (8, 256, 512), (14, 512, 512)] {
        let x = rand4(&mut r, (2, hw, hw, cin), 0.0, 1.0);
        let k = rand4(&mut r, (3, 3, cin, cout), -0.05, 0.05);
        let b = rand1(&mut r, cout, -0.1, 0.1);
        let i = run(ConvPath::Im2col, &x, &k, &b, true);
        for &isa in &isas {
            let d = run(ConvPath::Direct(isa), &x, &k, &b, true);
            let e = rel_err(d.iter(), i.mapv(|v| v as f64).iter());
            assert!(
                e <= tol::F32_FORWARD,
                "{hw}x{hw} {cin}->{cout}: direct {isa:?} vs im2col {e}"
            );
        }
    }
}

#[test]
fn maxpool_infer_equals_forward() {
    let mut r = rng(53);
    for &(n, h, w, c) in &[(2, 6, 6, 5), (1, 7, 5, 64), (3, 2, 2, 1), (1, 1, 1, 3)] {
        let mut x = rand4(&mut r, (n, h, w, c), -1.0, 1.0);
        // Ties and NaN: the same comparisons give the same winner.
        x[[0, 0, 0, 0]] = f32::NAN;
        if h > 1 && w > 1 {
            x[[0, 1, 1, 0]] = x[[0, 0, 1, 0]];
        }
        let (want, _) = maxpool2x2_forward(x.view());
        let got = maxpool2x2_infer(x.view());
        assert_eq!(got.dim(), want.dim());
        let same = got.iter().zip(want.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "maxpool2x2_infer differs from maxpool2x2_forward at {:?}",
            (n, h, w, c)
        );
    }
}

/// A prepared base (kernels packed once, reused; layer outputs written into
/// buffers freed by earlier layers and batches, stale values and all) gives
/// bit for bit what one-off forward passes give, at every layer, across
/// batches of different image sizes and batch sizes (64 px packs block1-5;
/// 32 px reuses them, its 4x4 and 2x2 layers never touch them; a larger
/// batch after smaller ones needs larger buffers), and from inputs that are
/// not one plain buffer (a slice with an offset, a transposed layout).
#[test]
fn prepared_base_matches_one_off_forward() {
    let model = fake_vgg(54);
    let net = model.prepare();
    let mut r = rng(55);
    for (b, &(n, s)) in [(2usize, 64usize), (3, 32), (1, 64), (3, 64), (2, 32)]
        .iter()
        .enumerate()
    {
        let x = rand4(&mut r, (n, s, s, 3), -100.0, 100.0);
        // Layer by layer through the public ops, packing per call.
        let mut want = Vec::new();
        let mut y = x.clone();
        for (i, l) in LAYERS.iter().enumerate() {
            y = match l.kind {
                Kind::Conv { .. } => {
                    let p = model.conv_at(i);
                    conv3x3_forward(y.view(), p.w.view(), Some(p.b.view()), true)
                }
                Kind::Pool => maxpool2x2_forward(y.view()).0,
            };
            want.push(y.clone());
        }
        // The same values in a buffer of another shape: batch 1 as a slice
        // past its start, batch 3 in a transposed memory layout.
        let input = match b {
            1 => {
                let mut big = ndarray::Array4::<f32>::zeros((n + 1, s, s, 3));
                big.slice_mut(ndarray::s![1.., .., .., ..]).assign(&x);
                big.slice_move(ndarray::s![1.., .., .., ..])
            }
            3 => {
                let mut t = ndarray::Array4::<f32>::zeros((3, s, s, n));
                t.assign(&x.view().permuted_axes([3, 1, 2, 0]));
                t.permuted_axes([3, 1, 2, 0])
            }
            _ => x.clone(),
        };
        assert_eq!(input, x);
        let mut got = Vec::new();
        let last = net.forward_range(input, 0..LAYERS.len(), &mut |_, a| got.push(a.to_owned()));
        assert_eq!(got.len(), LAYERS.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.dim(), w.dim(), "{} at {n} x {s} px", LAYERS[i].name);
            let same = g.iter().zip(w.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "prepared base differs at {} ({n} x {s} px)", LAYERS[i].name);
        }
        assert_eq!(last, want[LAYERS.len() - 1]);
        let once = gap_forward(y.view());
        let reused = net.features(x);
        assert_eq!(once.dim(), (n, 512));
        let same = once.iter().zip(reused.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "prepared base differs at {n} x {s} px");
    }
    // A range that starts inside the base, and an empty one.
    let x = rand4(&mut r, (2, 4, 4, 512), 0.0, 3.0);
    let mut y = x.clone();
    for (i, l) in LAYERS.iter().enumerate().skip(BLOCK5_START) {
        y = match l.kind {
            Kind::Conv { .. } => {
                let p = model.conv_at(i);
                conv3x3_forward(y.view(), p.w.view(), Some(p.b.view()), true)
            }
            Kind::Pool => maxpool2x2_forward(y.view()).0,
        };
    }
    assert_eq!(
        net.forward_range(x.clone(), BLOCK5_START..LAYERS.len(), &mut |_, _| {}),
        y
    );
    assert_eq!(net.forward_range(x.clone(), 3..3, &mut |_, _| panic!("no layer")), x);
}

/// The transposed convolution's kernel prepared straight from W (dX in
/// stage 2: the direct kernel's packing, Winograd's transform) is the one
/// prepared from the flipped copy, element for element, so dX is
/// bit-identical either way; shapes with several channel chunks, partial
/// panels, partial transform jobs (channels not a multiple of 16) and
/// Cin < 16 (gathered rows).
#[test]
fn flipped_packing_equals_packing_the_flipped_kernel() {
    use vgg16_cpu::tensor::conv::{conv3x3_forward_prepared, flip_kernel, PreparedKernel};
    use vgg16_cpu::tensor::direct::PackedKernel;
    use vgg16_cpu::tensor::winograd::WinogradKernel;
    for isa in isas_or_skip("flipped_packing_equals_packing_the_flipped_kernel") {
        for (i, &(n, h, w, cin, cout)) in [
            (1, 5, 6, 19, 21),
            (2, 4, 3, 40, 150),
            (1, 3, 3, 33, 8),
            (1, 9, 10, 70, 37),
        ]
        .iter()
        .enumerate()
        {
            let mut r = rng(90 + i as u64);
            // dz has Cout channels; the transposed conv maps them to Cin.
            let dz = rand4(&mut r, (n, h, w, cout), -1.0, 1.0);
            let k = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
            let flipped = flip_kernel(k.view());
            let want = ref_conv(&to64_4(dz.view()), &to64_4(flipped.view()), None, false);
            let pairs = [
                (
                    PreparedKernel::Direct(PackedKernel::from_keras_flipped(isa, k.view())),
                    PreparedKernel::Direct(PackedKernel::from_keras(isa, flipped.view())),
                    tol::F32_FORWARD,
                ),
                (
                    PreparedKernel::Winograd(WinogradKernel::from_keras_flipped(isa, k.view())),
                    PreparedKernel::Winograd(WinogradKernel::from_keras(isa, flipped.view())),
                    tol::WINOGRAD_FORWARD,
                ),
            ];
            for (fused, copied, bound) in &pairs {
                let what = format!(
                    "{} {} shape {:?}",
                    fused.path().name(),
                    isa.name(),
                    (n, h, w, cin, cout)
                );
                let a = conv3x3_forward_prepared(dz.view(), fused, None, false);
                let b = conv3x3_forward_prepared(dz.view(), copied, None, false);
                assert_eq!(a.dim(), (n, h, w, cin), "{what}");
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{what}: fused and copied preparations differ"
                );
                // And both are the transposed convolution: against the reference.
                let e = rel_err(a.iter(), want.iter());
                assert!(e <= *bound, "{what}: error {e}");
            }
        }
    }
}

/// A [`KernelSlot`] refilled with new weights (training reuses block5's
/// kernel buffers from step to step) runs exactly as a kernel prepared
/// fresh from those weights, on the direct and Winograd paths of every ISA
/// here, forward and flipped (dX's); and it does run the new weights, not
/// the buffer's old ones.
#[test]
fn refilled_kernels_equal_fresh_ones() {
    use vgg16_cpu::tensor::conv::{conv3x3_forward_prepared, flip_kernel, KernelSlot, PreparedKernel};
    for isa in isas_or_skip("refilled_kernels_equal_fresh_ones") {
        for path in [ConvPath::Direct(isa), ConvPath::Winograd(isa)] {
            for flipped in [false, true] {
                let (n, h, w, cin, cout) = (2, 6, 7, 24, 40);
                let mut r = rng(77);
                let (kin, kout) = if flipped { (cout, cin) } else { (cin, cout) };
                let x = rand4(&mut r, (n, h, w, kin), -1.0, 1.0);
                let k1 = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
                let k2 = rand4(&mut r, (3, 3, cin, cout), -0.5, 0.5);
                let what = format!("{} {} flipped={flipped}", path.name(), isa.name());
                let mut slot = KernelSlot::default();
                let old =
                    conv3x3_forward_prepared(x.view(), slot.prepare(path, k1.view(), flipped).unwrap(), None, false);
                let refilled = slot.prepare(path, k2.view(), flipped).unwrap();
                assert_eq!(refilled.path(), path, "{what}");
                let got = conv3x3_forward_prepared(x.view(), refilled, None, false);
                let k2f = if flipped { flip_kernel(k2.view()) } else { k2.clone() };
                let fresh = PreparedKernel::new(path, k2f.view()).unwrap();
                let want = conv3x3_forward_prepared(x.view(), &fresh, None, false);
                assert_eq!(got.dim(), (n, h, w, kout), "{what}");
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: refilled kernel differs from a fresh one"
                );
                assert!(
                    got.iter().zip(&old).any(|(a, b)| a != b),
                    "{what}: still the old weights"
                );
                let reference = ref_conv(&to64_4(x.view()), &to64_4(k2f.view()), None, false);
                let e = rel_err(got.iter(), reference.iter());
                assert!(e <= tol::WINOGRAD_FORWARD.max(tol::F32_FORWARD), "{what}: error {e}");
            }
        }
    }
}
