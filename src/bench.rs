//! The workload shapes benchmarks use (shared by `cargo bench` and the
//! `vgg16 bench` command) and a small median timer.

use std::time::{Duration, Instant};

/// One GEMM shape from VGG-16's im2col: m = output pixels x batch,
/// k = 9 * Cin, n = Cout.
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub name: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// The im2col GEMM shapes of VGG-16 that the engine issue names, plus a
/// square 2048 for comparison with published BLAS figures.
pub const GEMM_SHAPES: &[GemmShape] = &[
    GemmShape {
        name: "224_b1_block1_conv2",
        m: 50176,
        k: 576,
        n: 64,
    },
    GemmShape {
        name: "224_b1_block3_conv2",
        m: 3136,
        k: 2304,
        n: 256,
    },
    GemmShape {
        name: "224_b1_block4_conv2",
        m: 784,
        k: 4608,
        n: 512,
    },
    GemmShape {
        name: "224_b1_block5_conv2",
        m: 196,
        k: 4608,
        n: 512,
    },
    GemmShape {
        name: "32_b64_block1_conv2",
        m: 65536,
        k: 576,
        n: 64,
    },
    GemmShape {
        name: "32_b64_block4_conv2",
        m: 1024,
        k: 4608,
        n: 512,
    },
    GemmShape {
        name: "32_b64_block5_conv2",
        m: 256,
        k: 4608,
        n: 512,
    },
    GemmShape {
        name: "square_2048",
        m: 2048,
        k: 2048,
        n: 2048,
    },
];

/// VGG-16's 13 conv layers: (name, Cin, Cout, spatial divisor of the input
/// size: 1 for block1, 2 for block2, ... 16 for block5).
pub const VGG_CONVS: &[(&str, usize, usize, usize)] = &[
    ("block1_conv1", 3, 64, 1),
    ("block1_conv2", 64, 64, 1),
    ("block2_conv1", 64, 128, 2),
    ("block2_conv2", 128, 128, 2),
    ("block3_conv1", 128, 256, 4),
    ("block3_conv2", 256, 256, 4),
    ("block3_conv3", 256, 256, 4),
    ("block4_conv1", 256, 512, 8),
    ("block4_conv2", 512, 512, 8),
    ("block4_conv3", 512, 512, 8),
    ("block5_conv1", 512, 512, 16),
    ("block5_conv2", 512, 512, 16),
    ("block5_conv3", 512, 512, 16),
];

/// Runs `f` once to warm up, then until both `min_runs` runs and `min_time`
/// have passed; returns the median run time in seconds.
pub fn median_seconds(min_runs: usize, min_time: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_runs.max(1) || start.elapsed() < min_time {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
