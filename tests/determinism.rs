//! Bit-identical outputs and gradients with 1 and 2 threads (and 3, an odd
//! count): partitions depend on shapes only, never on the pool.

mod common;
use common::*;
use ndarray::Array2;
use vgg16_cpu::tensor::conv::{conv3x3_backward, conv3x3_forward, conv3x3_forward_path};
use vgg16_cpu::tensor::gemm::{sgemm_with, Backend};
use vgg16_cpu::tensor::ops::*;

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

fn bits(v: impl IntoIterator<Item = f32>) -> Vec<u32> {
    v.into_iter().map(f32::to_bits).collect()
}

#[test]
fn gemm_is_bit_identical_across_thread_counts() {
    let mut r = rng(20);
    let a = rand2(&mut r, (700, 900), -1.0, 1.0);
    let b = rand2(&mut r, (900, 530), -1.0, 1.0);
    for backend in Backend::available() {
        let run = || {
            let mut c = Array2::<f32>::zeros((700, 530));
            sgemm_with(backend, a.view(), b.view(), c.view_mut(), false);
            bits(c)
        };
        let one = in_pool(1, run);
        assert_eq!(one, in_pool(2, run), "{backend:?}: 1 vs 2 threads");
        assert_eq!(one, in_pool(3, run), "{backend:?}: 1 vs 3 threads");
    }
}

#[test]
fn conv_and_ops_are_bit_identical_across_thread_counts() {
    let mut r = rng(21);
    let x = rand4(&mut r, (3, 14, 14, 64), -1.0, 1.0);
    let w = rand4(&mut r, (3, 3, 64, 96), -0.1, 0.1);
    let bias = rand1(&mut r, 96, -0.1, 0.1);
    let dy = rand4(&mut r, (3, 14, 14, 96), -1.0, 1.0);
    let run = || {
        let y = conv3x3_forward(x.view(), w.view(), Some(bias.view()), true);
        let dz = relu_backward(y.view(), dy.view());
        let g = conv3x3_backward(x.view(), w.view(), dz.view(), true);
        let (p, arg) = maxpool2x2_forward(y.view());
        let gp = gap_forward(p.view());
        let mut out = bits(y.iter().copied());
        out.extend(bits(g.dw.iter().copied()));
        out.extend(bits(g.db.iter().copied()));
        out.extend(bits(g.dx.unwrap().iter().copied()));
        out.extend(bits(gp.iter().copied()));
        out.extend(arg.iter().map(|&a| a as u32));
        out
    };
    let one = in_pool(1, run);
    assert_eq!(one, in_pool(2, run), "1 vs 2 threads");
    assert_eq!(one, in_pool(3, run), "1 vs 3 threads");
}

/// Every conv path this CPU runs (the direct kernel per ISA, im2col, tap
/// classes at 2x2 and 4x4 as block5 and block4 see at 32 px), on its own.
#[test]
fn every_conv_path_is_bit_identical_across_thread_counts() {
    let mut r = rng(22);
    for &(n, hw, cin, cout) in &[
        (2, 14, 64, 40),
        (3, 9, 130, 70),
        (4, 2, 96, 64),
        (2, 4, 64, 48),
        (2, 7, 3, 64),
    ] {
        let x = rand4(&mut r, (n, hw, hw, cin), -1.0, 1.0);
        let w = rand4(&mut r, (3, 3, cin, cout), -0.1, 0.1);
        let bias = rand1(&mut r, cout, -0.1, 0.1);
        for path in paths_or_skip("every_conv_path_is_bit_identical_across_thread_counts", hw, hw) {
            let run = || {
                let mut out = Array2::<f32>::zeros((n * hw * hw, cout));
                conv3x3_forward_path(path, x.view(), w.view(), Some(bias.view()), true, out.view_mut());
                bits(out)
            };
            let one = in_pool(1, run);
            assert_eq!(one, in_pool(2, run), "{path:?} {hw}x{hw}: 1 vs 2 threads");
            assert_eq!(one, in_pool(3, run), "{path:?} {hw}x{hw}: 1 vs 3 threads");
        }
    }
}

/// The head's layers and the optimizer: dense forward / backward, softmax
/// cross-entropy and the SGD momentum step.
#[test]
fn dense_softmax_and_sgd_are_bit_identical_across_thread_counts() {
    let mut r = rng(23);
    let x = rand2(&mut r, (300, 512), -1.0, 1.0);
    let w = rand2(&mut r, (512, 10), -0.1, 0.1);
    let b = rand1(&mut r, 10, -0.1, 0.1);
    let labels: Vec<u8> = (0..300).map(|i| (i * 7 % 10) as u8).collect();
    let w0 = rand_vec(&mut r, 2_400_000, -0.1, 0.1);
    let g = rand_vec(&mut r, 2_400_000, -1.0, 1.0);
    let run = || {
        let logits = dense_forward(x.view(), w.view(), b.view());
        let (loss, dl) = softmax_cross_entropy(logits.view(), &labels);
        let (dx, dw, db) = dense_backward(x.view(), w.view(), dl.view());
        let (mut ww, mut v) = (w0.clone(), vec![0.0f32; w0.len()]);
        for _ in 0..3 {
            vgg16_cpu::train::optim::sgd_momentum_step(&mut ww, &mut v, &g, 0.01, 0.9);
        }
        let mut out = bits([loss]);
        out.extend(bits(logits.iter().copied()));
        out.extend(bits(dx.iter().copied()));
        out.extend(bits(dw.iter().copied()));
        out.extend(bits(db.iter().copied()));
        out.extend(bits(ww));
        out.extend(bits(v));
        out
    };
    let one = in_pool(1, run);
    assert_eq!(one, in_pool(2, run), "1 vs 2 threads");
    assert_eq!(one, in_pool(3, run), "1 vs 3 threads");
}

/// The whole program: `vgg16 train --threads 1` and `--threads 2` on a slice
/// at 32 px (blocks 1-4 cached, block5 on the tap-class path) write the same
/// history and the same model, bit for bit.
#[test]
fn train_is_bit_identical_with_1_and_2_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("w.npz");
    fake_vgg(8).save_npz(&w).unwrap();
    let run = |threads: &str| {
        let out = tmp.path().join(format!("run{threads}"));
        let o = vgg16(&[
            "train",
            "--data",
            sample_dir().to_str().unwrap(),
            "--weights",
            w.to_str().unwrap(),
            "--image-size",
            "32",
            "--limit-train",
            "64",
            "--limit-test",
            "32",
            "--stage1-epochs",
            "1",
            "--stage2-epochs",
            "1",
            "--stage2-batch-size",
            "16",
            "--threads",
            threads,
            "--cache-dir",
            tmp.path().join(format!("cache{threads}")).to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let history: Vec<String> = std::fs::read_to_string(out.join("history.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(6).collect::<Vec<_>>().join(","))
            .collect();
        let m = vgg16_cpu::model::saved::SavedModel::load(&out).unwrap();
        let mut weights = bits(m.head.out.w.iter().copied());
        for p in m.block5() {
            weights.extend(bits(p.w.iter().copied()));
        }
        (history, weights)
    };
    let (h1, w1) = run("1");
    let (h2, w2) = run("2");
    assert_eq!(h1, h2);
    assert!(w1 == w2, "the saved weights differ between 1 and 2 threads");
}
