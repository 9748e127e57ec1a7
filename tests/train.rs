//! Training: the whole stage-2 gradient by finite differences, the cached
//! path against recomputing blocks 1-4 (`--no-cache`), resume equality, and
//! a small real run that learns.

mod common;
use common::*;
use ndarray::{Array1, Array2, Array4};
use rand::Rng;
use vgg16_cpu::data::cifar::{self, Split};
use vgg16_cpu::features::cache::{self, CacheKey, Dtype};
use vgg16_cpu::features::{Cached, Features, Live};
use vgg16_cpu::model::vgg::ConvParams;
use vgg16_cpu::model::*;
use vgg16_cpu::tensor::ops::softmax_cross_entropy;
use vgg16_cpu::train::{self as tr, Inputs, State};
use vgg16_cpu::{Silent, StageConfig, TrainConfig};

// ------------------------------------------------------------ gradient

struct Tiny {
    x4: Array4<f32>,
    convs: Vec<ConvParams>,
    head: Head,
    labels: Vec<u8>,
}

fn tiny(seed: u64, hidden: bool) -> Tiny {
    let c = 6;
    let mut r = rng(seed);
    let x4 = rand4(&mut r, (3, 4, 4, c), -1.0, 1.0);
    let convs = (0..3)
        .map(|_| ConvParams {
            w: rand4(&mut r, (3, 3, c, c), -0.4, 0.4),
            b: rand1(&mut r, c, 0.0, 0.3),
        })
        .collect();
    let dense = |r: &mut rand_chacha::ChaCha8Rng, i: usize, o: usize| Dense {
        w: rand2(r, (i, o), -0.8, 0.8),
        b: rand1(r, o, -0.2, 0.2),
    };
    let head = if hidden {
        Head {
            hidden: Some(dense(&mut r, c, 5)),
            out: dense(&mut r, 5, 4),
            dropout: 0.0,
            norm: None,
        }
    } else {
        Head {
            hidden: None,
            out: dense(&mut r, c, 4),
            dropout: 0.0,
            norm: None,
        }
    };
    let labels = (0..3).map(|_| r.gen_range(0..4)).collect();
    Tiny {
        x4,
        convs,
        head,
        labels,
    }
}

/// The same network in f64 from the nested-loop references.
fn ref_loss(t: &Tiny, convs: &[(Array4<f64>, Array1<f64>)], head: &[(Array2<f64>, Array1<f64>)]) -> f64 {
    let mut x = to64_4(t.x4.view());
    for (w, b) in convs {
        x = ref_conv(&x, w, Some(b), true);
    }
    let mut g = ref_gap(&ref_maxpool(&x));
    for (i, (w, b)) in head.iter().enumerate() {
        g = ref_dense(&g, w, b);
        if i + 1 < head.len() {
            g.mapv_inplace(|v| v.max(0.0));
        }
    }
    ref_softmax_ce(&g, &t.labels)
}

/// Smallest |pre-activation| anywhere in the f64 network: perturbations of
/// FD_EPS must not cross a ReLU kink.
fn min_preact(t: &Tiny) -> f64 {
    let mut x = to64_4(t.x4.view());
    let mut m = f64::INFINITY;
    for p in &t.convs {
        let z = ref_conv(&x, &to64_4(p.w.view()), Some(&p.b.mapv(|v| v as f64)), false);
        m = m.min(z.iter().fold(f64::INFINITY, |a, v| a.min(v.abs())));
        x = z.mapv(|v| v.max(0.0));
    }
    m
}

#[test]
fn stage2_gradient_matches_finite_differences() {
    for hidden in [false, true] {
        // Draw until no pre-activation sits within 1e-3 of a ReLU kink.
        let t = (0..200u64)
            .map(|s| tiny(1000 + s, hidden))
            .find(|t| min_preact(t) > 1e-3)
            .expect("a kink-free draw");
        let mut kernels = Block5Kernels::new();
        let (g, acts) = block5_forward(&t.convs, t.x4.clone(), &mut kernels);
        let (logits, hacts) = head_forward(&t.head, g.view(), None);
        let (_, dlogits) = softmax_cross_entropy(logits.view(), &t.labels);
        let (dg, hg) = head_backward(&t.head, &hacts, dlogits.view());
        let cg = block5_backward(&t.convs, &acts, dg.view(), &kernels);

        let convs64: Vec<_> = t
            .convs
            .iter()
            .map(|p| (to64_4(p.w.view()), p.b.mapv(|v| v as f64)))
            .collect();
        let mut dense: Vec<&Dense> = t.head.hidden.iter().collect();
        dense.push(&t.head.out);
        let head64: Vec<_> = dense
            .iter()
            .map(|d| (d.w.mapv(|v| v as f64), d.b.mapv(|v| v as f64)))
            .collect();
        let mut r = rng(7);
        let eps = tol::FD_EPS;
        for (l, grads) in cg.iter().enumerate() {
            for _ in 0..12 {
                let i = (
                    r.gen_range(0..3),
                    r.gen_range(0..3),
                    r.gen_range(0..6),
                    r.gen_range(0..6),
                );
                let f = |d: f64| {
                    let mut c = convs64.clone();
                    c[l].0[i] += d;
                    ref_loss(&t, &c, &head64)
                };
                let num = (f(eps) - f(-eps)) / (2.0 * eps);
                let e = grad_err(grads.dw[i] as f64, num);
                assert!(
                    e <= tol::GRAD_REL,
                    "hidden={hidden} conv5_{} dW{i:?}: {} vs {num} ({e})",
                    l + 1,
                    grads.dw[i]
                );
                let j = r.gen_range(0..6);
                let f = |d: f64| {
                    let mut c = convs64.clone();
                    c[l].1[j] += d;
                    ref_loss(&t, &c, &head64)
                };
                let num = (f(eps) - f(-eps)) / (2.0 * eps);
                assert!(
                    grad_err(grads.db[j] as f64, num) <= tol::GRAD_REL,
                    "conv5_{} db[{j}]: {} vs {num}",
                    l + 1,
                    grads.db[j]
                );
            }
        }
        let mut hgrads: Vec<&Dense> = hg.hidden.iter().collect();
        hgrads.push(&hg.out);
        for (l, d) in hgrads.iter().enumerate() {
            for i in ndarray::indices(d.w.dim()) {
                let f = |e: f64| {
                    let mut h = head64.clone();
                    h[l].0[i] += e;
                    ref_loss(&t, &convs64, &h)
                };
                let num = (f(eps) - f(-eps)) / (2.0 * eps);
                assert!(
                    grad_err(d.w[i] as f64, num) <= tol::GRAD_REL,
                    "dense {l} dW{i:?}: {} vs {num}",
                    d.w[i]
                );
            }
        }
    }
}

/// Block5's kernels kept from step to step (refilled after each update)
/// give the same gradients, bit for bit, as kernels prepared afresh, on a
/// shape that takes prepared paths (8x8, 16 channels); and skipping
/// `weights_changed` would run the old weights (what the call is for).
#[test]
fn block5_kernels_kept_across_steps_equal_fresh_ones() {
    let c = 16;
    let mut r = rng(5);
    let x4 = rand4(&mut r, (2, 8, 8, c), -1.0, 1.0);
    let mut convs: Vec<ConvParams> = (0..3)
        .map(|_| ConvParams {
            w: rand4(&mut r, (3, 3, c, c), -0.3, 0.3),
            b: rand1(&mut r, c, 0.0, 0.3),
        })
        .collect();
    let grads = |convs: &[ConvParams], k: &mut Block5Kernels| {
        let (g, acts) = block5_forward(convs, x4.clone(), k);
        let dg = g.mapv(|v| v - 0.1);
        let cg = block5_backward(convs, &acts, dg.view(), k);
        (g, cg)
    };
    let mut kept = Block5Kernels::new();
    let _ = grads(&convs, &mut kept);
    for p in convs.iter_mut() {
        p.w.mapv_inplace(|v| v * 0.9 + 0.01);
    }
    let (stale, _) = grads(&convs, &mut kept);
    kept.weights_changed();
    let (g1, cg1) = grads(&convs, &mut kept);
    let (g2, cg2) = grads(&convs, &mut Block5Kernels::new());
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(g1.as_slice().unwrap(), g2.as_slice().unwrap()), "features differ");
    for (a, b) in cg1.iter().zip(&cg2) {
        assert!(same(a.dw.as_slice().unwrap(), b.dw.as_slice().unwrap()), "dW differs");
        assert!(same(a.db.as_slice().unwrap(), b.db.as_slice().unwrap()), "db differs");
    }
    assert!(
        !same(stale.as_slice().unwrap(), g1.as_slice().unwrap()),
        "kernels not refilled: old weights ran"
    );
}

/// Inference keeps block5's kernels across batches (`Block5Infer`): every
/// batch, of any size, gets bit for bit what a one-off `block5_features`
/// gives, on sides with prepared kernels (8x8, 4x4: Winograd on AVX2 /
/// AVX-512) and without (2x2: tap classes), the side changing between
/// calls.
#[test]
fn block5_inference_kernels_kept_across_batches_equal_one_off() {
    let c = 16;
    let mut r = rng(6);
    let convs: Vec<ConvParams> = (0..3)
        .map(|_| ConvParams {
            w: rand4(&mut r, (3, 3, c, c), -0.3, 0.3),
            b: rand1(&mut r, c, 0.0, 0.3),
        })
        .collect();
    let same = |a: &Array2<f32>, b: &Array2<f32>| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    let mut kept = Block5Infer::new();
    for (n, side) in [(3, 8), (5, 8), (2, 4), (7, 4), (4, 2), (1, 8)] {
        let x4 = rand4(&mut r, (n, side, side, c), -1.0, 1.0);
        let got = kept.features(&convs, x4.view());
        let want = block5_features(&convs, x4.view());
        assert_eq!(got.dim(), (n, c));
        assert!(same(&got, &want), "{n} images of {side}x{side}: kept kernels differ");
    }
}

// ------------------------------------------------------------ cached vs live, resume

fn config(seed: u64) -> TrainConfig {
    TrainConfig {
        image_size: 32,
        stage1: StageConfig::sgd(0.001, 0.0, 16, 1),
        stage2: StageConfig::sgd(1e-4, 0.9, 16, 2),
        hidden: None,
        dropout: 0.0,
        seed,
        classes: 10,
        limit_train: None,
        limit_test: None,
        validation_split: None,
        ..TrainConfig::recipe(32, 10)
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn cached_and_live_paths_give_the_same_numbers() {
    let model = fake_vgg(3);
    let src = cifar::locate(&sample_dir()).unwrap();
    let train = cifar::load_split(&src, Split::Train).unwrap();
    let test = cifar::load_split(&src, Split::Test).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (n_train, n_test) = (48, 20);
    let kt = CacheKey::new(&model.digest(), 32, &train, n_train, Dtype::F32);
    let ke = CacheKey::new(&model.digest(), 32, &test, n_test, Dtype::F32);
    let (ct, _) = cache::open_or_build(tmp.path(), &kt, &model, &train, 7, &mut Silent).unwrap();
    let (ce, _) = cache::open_or_build(tmp.path(), &ke, &model, &test, 7, &mut Silent).unwrap();
    let (cached_tr, cached_te) = (Cached(&ct), Cached(&ce));
    let live_tr = Live::new(&model, &train, 32, n_train);
    let live_te = Live::new(&model, &test, 32, n_test);

    // Features: the same records in another batch make-up.
    let idx = [5usize, 40, 3, 17, 0];
    let (a, b) = (cached_tr.block4(&idx).unwrap(), live_tr.block4(&idx).unwrap());
    let e = rel_err(a.iter(), b.mapv(|v| v as f64).iter());
    assert!(e <= 1e-5, "block4 cached vs live: {e}");
    let (a, b) = (cached_tr.gap(&idx).unwrap(), live_tr.gap(&idx).unwrap());
    let e = rel_err(a.iter(), b.mapv(|v| v as f64).iter());
    assert!(e <= 1e-5, "gap cached vs live: {e}");

    // Training: losses of every epoch agree.
    let cfg = config(11);
    let tidx: Vec<usize> = (0..n_train).collect();
    let eidx: Vec<usize> = (0..n_test).collect();
    let run = |ftr: &dyn Features, fte: &dyn Features| {
        let mut s = State::new(&model, &cfg);
        let inputs = Inputs {
            train: ftr,
            train_flipped: None,
            train_idx: &tidx,
            val: fte,
            val_idx: &eidx,
            test: None,
        };
        tr::run(&cfg, &inputs, &mut s, &mut |_| Ok(()), &mut Silent).unwrap();
        s
    };
    let sc = run(&cached_tr, &cached_te);
    let sl = run(&live_tr, &live_te);
    assert_eq!(sc.history.len(), 3);
    for (a, b) in sc.history.iter().zip(&sl.history) {
        for (x, y, what) in [
            (a.train_loss, b.train_loss, "train_loss"),
            (a.val_loss, b.val_loss, "val_loss"),
        ] {
            assert!(
                x.is_finite() && rel(x, y) <= 1e-5,
                "stage {} epoch {} {what}: cached {x} vs live {y}",
                a.stage,
                a.epoch
            );
        }
    }
    // The cache must actually have changed something: stage 2 moved block5.
    assert_ne!(sc.block5[2].w, model.convs[12].w);
}

#[test]
fn resumed_run_ends_with_the_same_numbers() {
    let model = fake_vgg(4);
    let src = cifar::locate(&sample_dir()).unwrap();
    let train = cifar::load_split(&src, Split::Train).unwrap();
    let test = cifar::load_split(&src, Split::Test).unwrap();
    let live_tr = Live::new(&model, &train, 32, 40);
    let live_te = Live::new(&model, &test, 32, 10);
    let train_flipped = train.flipped();
    let live_fl = Live::new(&model, &train_flipped, 32, 40);
    let mut seed = config(5);
    seed.hidden = Some(16);
    seed.dropout = 0.25;
    // The tuned recipe's parts, all at once: standardized head, weight
    // decay, cosine with warm-up, label smoothing (set here: not a default),
    // best-epoch restore on held-out training records, and the mirrored view.
    let mut tuned = TrainConfig::tuned(32, 10);
    tuned.flip = true;
    tuned.stage1 = StageConfig {
        epochs: 2,
        batch_size: 8,
        label_smoothing: 0.1,
        ..tuned.stage1
    };
    tuned.stage2 = StageConfig {
        epochs: 2,
        batch_size: 8,
        label_smoothing: 0.1,
        ..tuned.stage2
    };
    tuned.seed = 6;
    tuned.validation_split = Some(0.25);
    tuned.restore_best = true;
    tuned.check().unwrap();
    let tidx: Vec<usize> = (0..40).collect();
    let eidx: Vec<usize> = (0..10).collect();
    // (config, train records, validation records, checkpoint to stop after:
    // stage 2's first epoch).
    for (cfg, tr_idx, val_idx, stop) in [(seed, &tidx[..], &eidx[..], 3), (tuned, &tidx[..30], &tidx[30..], 4)] {
        let held_out = cfg.validation_split.is_some();
        let inputs = Inputs {
            train: &live_tr,
            train_flipped: cfg.flip.then_some(&live_fl as &dyn Features),
            train_idx: tr_idx,
            val: if held_out { &live_tr } else { &live_te },
            val_idx,
            test: held_out.then_some((&live_te as &dyn Features, &eidx[..])),
        };

        let mut whole = State::new(&model, &cfg);
        tr::run(&cfg, &inputs, &mut whole, &mut |_| Ok(()), &mut Silent).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut first = State::new(&model, &cfg);
        let mut calls = 0;
        let r = tr::run(
            &cfg,
            &inputs,
            &mut first,
            &mut |s| {
                tr::save_checkpoint(dir.path(), &cfg, None, s)?;
                calls += 1;
                if calls == stop {
                    return Err(vgg16_cpu::Error::config("simulated interruption"));
                }
                Ok(())
            },
            &mut Silent,
        );
        assert!(r.is_err());
        let (cfg2, mut resumed) = tr::load_checkpoint(dir.path()).unwrap();
        assert_eq!(cfg2, cfg);
        assert_eq!((resumed.stage, resumed.epochs_done), (2, 1));
        assert_eq!(resumed.head.norm.is_some(), cfg.standardize);
        assert_eq!(resumed.best.is_some(), cfg.restore_best);
        tr::run(&cfg2, &inputs, &mut resumed, &mut |_| Ok(()), &mut Silent).unwrap();

        assert_eq!(
            history_numbers(&whole.history),
            history_numbers(&resumed.history),
            "{}",
            cfg.recipe
        );
        for (a, b) in whole.block5.iter().zip(&resumed.block5) {
            assert_eq!(a.w, b.w);
            assert_eq!(a.b, b.b);
        }
        assert_eq!(whole.head.out.w, resumed.head.out.w);
        let tests = |s: &State| {
            s.stage_results
                .iter()
                .map(|r| (r.stage, r.test_loss, r.test_accuracy))
                .collect::<Vec<_>>()
        };
        assert_eq!(tests(&whole), tests(&resumed));
    }
}

/// A small real run: the sample (500 training images) at 32 px with the
/// ImageNet weights learns well above chance (10%).
#[test]
#[cfg_attr(not(has_weights), ignore = "needs the ImageNet weights (vgg16 weights fetch)")]
fn small_real_run_learns() {
    let model = vgg16_cpu::model::vgg::Vgg16::load_npz(&imagenet_weights()).unwrap();
    let src = cifar::locate(&sample_dir()).unwrap();
    let train = cifar::load_split(&src, Split::Train).unwrap();
    let test = cifar::load_split(&src, Split::Test).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let kt = CacheKey::new(&model.digest(), 32, &train, 500, Dtype::F16);
    let ke = CacheKey::new(&model.digest(), 32, &test, 100, Dtype::F16);
    let (ct, _) = cache::open_or_build(tmp.path(), &kt, &model, &train, 64, &mut Silent).unwrap();
    let (ce, _) = cache::open_or_build(tmp.path(), &ke, &model, &test, 64, &mut Silent).unwrap();
    let mut cfg = config(1);
    cfg.stage1 = StageConfig::sgd(0.01, 0.0, 32, 2);
    cfg.stage2 = StageConfig::sgd(1e-4, 0.9, 64, 3);
    let tidx: Vec<usize> = (0..500).collect();
    let eidx: Vec<usize> = (0..100).collect();
    let inputs = Inputs {
        train: &Cached(&ct),
        train_flipped: None,
        train_idx: &tidx,
        val: &Cached(&ce),
        val_idx: &eidx,
        test: None,
    };
    let mut s = State::new(&model, &cfg);
    tr::run(&cfg, &inputs, &mut s, &mut |_| Ok(()), &mut Silent).unwrap();
    let s1 = &s.stage_results[0];
    let s2 = &s.stage_results[1];
    eprintln!(
        "sample run: stage 1 test acc {:.3}, stage 2 test acc {:.3}",
        s1.test_accuracy, s2.test_accuracy
    );
    assert!(
        s1.test_accuracy >= 0.2,
        "stage 1 test accuracy {} is not clearly above chance",
        s1.test_accuracy
    );
    assert!(
        s2.test_accuracy >= 0.2,
        "stage 2 test accuracy {} is not clearly above chance",
        s2.test_accuracy
    );
    let last = s.history.last().unwrap();
    assert!(
        last.train_accuracy > 0.5,
        "stage 2 does not fit the training set: {}",
        last.train_accuracy
    );
}
