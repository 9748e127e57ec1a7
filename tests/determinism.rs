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
    for backend in Backend::ALL {
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
