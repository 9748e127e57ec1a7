//! The one place that decides how a 3x3 conv layer runs: which algorithm
//! (tap classes, im2col + GEMM, the direct kernel) and on which instruction
//! set (AVX-512, AVX2 + FMA, portable Rust).
//!
//! The choice depends on the CPU and the image side only, never on the thread
//! count, so results stay bit-identical for any `--threads`. Two environment
//! variables, read once per process, force a path so that every kernel can be
//! run and compared on any machine able to run it:
//!
//! - `VGG16_ISA=avx512|avx2|generic`: the instruction set of the direct
//!   kernel (refused when this CPU lacks it);
//! - `VGG16_CONV=winograd|direct|im2col|auto`: the algorithm for images
//!   larger than [`SMALL_SIDE`] (tap classes always serve the smaller ones,
//!   where most taps fall on the padding; Winograd never serves layers of
//!   fewer than [`crate::tensor::winograd::MIN_CIN`] input channels, the RGB
//!   layer, which then runs direct).
//!
//! Tests do not set variables (they are process-wide); they name the
//! [`ConvPath`] they want and call [`crate::tensor::conv::conv3x3_forward_path`].

use crate::tensor::gemm::Backend;
use std::sync::OnceLock;

/// Images with both sides at most this use tap classes (see `conv.rs`),
/// except where Winograd serves the layer and both sides are at least
/// [`WINOGRAD_MIN_SIDE`].
pub const SMALL_SIDE: usize = 4;

/// The smallest image side Winograd F(4,3) takes over from tap classes: a
/// 4x4 image is one whole output tile, 36 products a channel pair against
/// tap classes' 100 (its valid taps). Measured on AVX2, 2 threads, 64
/// images, 512 -> 512 (`examples/conv_layer`): 4x4 21 ms against 40 ms
/// (8 images: 5 / 12 ms; 256 -> 512: 10 / 18 ms); at 3x3 18.6 / 21 ms, too
/// close to pay for a kernel transform in training; at 2x2 21 / 7 ms.
pub const WINOGRAD_MIN_SIDE: usize = 4;

/// An instruction set a kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F: 12 x 32 micro-kernel in 24 zmm sums.
    Avx512,
    /// AVX2 + FMA (x86-64-v3): 6 x 16 micro-kernel in 12 ymm sums.
    Avx2,
    /// Plain Rust, any target: the same loop nest, auto-vectorised.
    Generic,
}

impl Isa {
    /// Every ISA, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Generic];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Generic => "generic",
        }
    }

    pub fn from_name(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s)
    }

    /// True when this CPU can run kernels written for `self`.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2 => false,
            Isa::Generic => true,
        }
    }

    /// The fastest ISA this CPU supports.
    pub fn detect() -> Isa {
        Isa::ALL.into_iter().find(|i| i.supported()).unwrap_or(Isa::Generic)
    }

    /// Every ISA this CPU supports, fastest first (tests run each).
    pub fn supported_all() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }
}

/// The algorithm asked for a conv layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvAlgo {
    /// What [`Dispatch::path`] picks for the shape on this CPU.
    Auto,
    /// im2col tiles + GEMM (tap classes still serve small images).
    Im2col,
    /// The direct kernel at every size larger than [`SMALL_SIDE`], on the
    /// dispatch's ISA.
    Direct,
    /// Winograd F(4x4, 3x3) at every size larger than [`SMALL_SIDE`] with
    /// enough input channels; the direct kernel for the RGB layer.
    Winograd,
}

impl ConvAlgo {
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgo::Auto => "auto",
            ConvAlgo::Im2col => "im2col",
            ConvAlgo::Direct => "direct",
            ConvAlgo::Winograd => "winograd",
        }
    }

    pub fn from_name(s: &str) -> Option<ConvAlgo> {
        [ConvAlgo::Auto, ConvAlgo::Im2col, ConvAlgo::Direct, ConvAlgo::Winograd]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

/// What actually runs one conv layer: a resolved [`ConvAlgo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvPath {
    /// Small images: pixels grouped by which taps fall inside, one GEMM per
    /// class and kernel row (no padding taps multiplied).
    TapClasses,
    /// im2col into L2-sized tiles + single-threaded GEMM per tile.
    Im2col,
    /// The direct kernel (no im2col copy) for this ISA.
    Direct(Isa),
    /// Winograd F(4x4, 3x3), its GEMMs on this ISA's micro-kernel.
    Winograd(Isa),
}

impl ConvPath {
    pub fn name(self) -> String {
        match self {
            ConvPath::TapClasses => "tap_classes".into(),
            ConvPath::Im2col => "im2col".into(),
            ConvPath::Direct(isa) => format!("direct_{}", isa.name()),
            ConvPath::Winograd(isa) => format!("winograd_{}", isa.name()),
        }
    }
}

/// A forced ISA or algorithm that cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DispatchError {
    #[error("VGG16_ISA={0:?} is not one of avx512, avx2, generic")]
    UnknownIsa(String),
    #[error("VGG16_ISA={0} asks for an instruction set this CPU does not have (it has: {1})")]
    UnsupportedIsa(&'static str, String),
    #[error("VGG16_CONV={0:?} is not one of auto, winograd, direct, im2col")]
    UnknownConv(String),
}

/// Fewest 4x4 output tiles for which a call that transforms its own
/// kernel takes Winograd under Auto ([`Dispatch::path_unprepared`]): one
/// image at 14x14 (16 tiles) stays on the direct kernel, two (32) take
/// Winograd.
pub const WINOGRAD_MIN_TILES: usize = 32;

/// [`WINOGRAD_MIN_TILES`], or `VGG16_WINOGRAD_MIN_TILES` when set (a
/// number): for measuring the crossover on another CPU with `vgg16 bench
/// step` (on Zen 5 AVX-512, 2026-12-02: 1, 2 images level, 4-16 images
/// 1.4-2x faster on Winograd than with the threshold out of reach).
fn min_tiles() -> usize {
    static T: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *T.get_or_init(|| match std::env::var("VGG16_WINOGRAD_MIN_TILES") {
        Err(_) => WINOGRAD_MIN_TILES,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("warning: VGG16_WINOGRAD_MIN_TILES={v:?} is not a number of tiles; using {WINOGRAD_MIN_TILES}");
            WINOGRAD_MIN_TILES
        }),
    })
}

/// The engine's choices for this process: ISA of the direct kernel and the
/// algorithm for images larger than [`SMALL_SIDE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub isa: Isa,
    pub conv: ConvAlgo,
}

impl Dispatch {
    /// The detected CPU's choice, nothing forced.
    pub fn detected() -> Dispatch {
        Dispatch {
            isa: Isa::detect(),
            conv: ConvAlgo::Auto,
        }
    }

    /// From the values of `VGG16_ISA` and `VGG16_CONV` (None: not set).
    pub fn from_vars(isa: Option<&str>, conv: Option<&str>) -> Result<Dispatch, DispatchError> {
        let mut d = Dispatch::detected();
        if let Some(s) = isa.map(str::trim).filter(|s| !s.is_empty()) {
            let i = Isa::from_name(&s.to_ascii_lowercase()).ok_or_else(|| DispatchError::UnknownIsa(s.into()))?;
            if !i.supported() {
                let have: Vec<&str> = Isa::supported_all().iter().map(|i| i.name()).collect();
                return Err(DispatchError::UnsupportedIsa(i.name(), have.join(", ")));
            }
            d.isa = i;
        }
        if let Some(s) = conv.map(str::trim).filter(|s| !s.is_empty()) {
            d.conv =
                ConvAlgo::from_name(&s.to_ascii_lowercase()).ok_or_else(|| DispatchError::UnknownConv(s.into()))?;
        }
        Ok(d)
    }

    /// From the process environment.
    pub fn from_env() -> Result<Dispatch, DispatchError> {
        let isa = std::env::var("VGG16_ISA").ok();
        let conv = std::env::var("VGG16_CONV").ok();
        Dispatch::from_vars(isa.as_deref(), conv.as_deref())
    }

    /// The process-wide dispatch, read from the environment once. An invalid
    /// setting falls back to [`Dispatch::detected`] here; the command line
    /// calls [`Dispatch::from_env`] first and refuses it with the reason.
    pub fn global() -> Dispatch {
        static GLOBAL: OnceLock<Dispatch> = OnceLock::new();
        *GLOBAL.get_or_init(|| Dispatch::from_env().unwrap_or_else(|_| Dispatch::detected()))
    }

    /// The path for an `h` x `w` image of `cin` channels when `algo` is
    /// asked for.
    ///
    /// Auto: tap classes up to [`SMALL_SIDE`] (Winograd from
    /// [`WINOGRAD_MIN_SIDE`] where it serves the layer); above it Winograd F(4,3)
    /// where there are enough input channels, on AVX-512 or AVX2 (measured
    /// faster than the direct kernel at every VGG-16 layer from
    /// block1_conv2 on, on both: BENCHMARKS.md 7.2 and 11); the RGB layer on the direct kernel
    /// (AVX-512 or AVX2);
    /// im2col + GEMM for everything on the portable ISA (the `gemm` crate
    /// has tuned kernels for more targets than ours).
    pub fn path(&self, algo: ConvAlgo, h: usize, w: usize, cin: usize) -> ConvPath {
        let path = self.path_large(algo, cin);
        let small = h <= SMALL_SIDE && w <= SMALL_SIDE;
        let winograd_fits = matches!(path, ConvPath::Winograd(_)) && h.min(w) >= WINOGRAD_MIN_SIDE;
        if small && !winograd_fits {
            ConvPath::TapClasses
        } else {
            path
        }
    }

    /// [`Dispatch::path`] for an image larger than [`SMALL_SIDE`].
    fn path_large(&self, algo: ConvAlgo, cin: usize) -> ConvPath {
        let algo = if algo == ConvAlgo::Auto { self.conv } else { algo };
        let winograd_ok = cin >= crate::tensor::winograd::MIN_CIN;
        match algo {
            ConvAlgo::Im2col => ConvPath::Im2col,
            ConvAlgo::Direct => ConvPath::Direct(self.isa),
            ConvAlgo::Winograd if winograd_ok => ConvPath::Winograd(self.isa),
            ConvAlgo::Winograd => ConvPath::Direct(self.isa),
            ConvAlgo::Auto => match self.isa {
                Isa::Avx512 | Isa::Avx2 if winograd_ok => ConvPath::Winograd(self.isa),
                // The RGB layer: the 6x16 AVX2 kernel on 27-long gathered
                // rows measured 0.7x of im2col + GEMM (BENCHMARKS.md section
                // 7), level on rows of three pixels (section 14.4), 1.75x
                // with its epilogue inlined (section 17.1).
                Isa::Avx512 | Isa::Avx2 => ConvPath::Direct(self.isa),
                Isa::Generic => ConvPath::Im2col,
            },
        }
    }

    /// [`Dispatch::path`] for one call that transforms its kernel for
    /// itself (training, whose weights change every step: block5's forward
    /// and dX; an unprepared `conv3x3_forward`). Winograd's kernel
    /// transform and the reads of the 4x larger transformed kernel cost the
    /// same whatever the batch, so under [`WINOGRAD_MIN_TILES`] output
    /// tiles in the call Auto takes the direct kernel instead (measured on
    /// AVX2 at 14x14, `vgg16 bench step`, ms a step direct / Winograd:
    /// 1 thread, 1 image 159-177 / 204-208, 2 images 306-332 / 242-253,
    /// 4 images 375-432 / 292-312; BENCHMARKS.md 10.3). A forced
    /// `VGG16_CONV` is kept as it is.
    pub fn path_unprepared(&self, algo: ConvAlgo, n: usize, h: usize, w: usize, cin: usize) -> ConvPath {
        let p = self.path(algo, h, w, cin);
        let auto = algo == ConvAlgo::Auto && self.conv == ConvAlgo::Auto;
        match p {
            // The direct kernel, or tap classes on a small image.
            ConvPath::Winograd(_) if auto && n * h.div_ceil(4) * w.div_ceil(4) < min_tiles() => {
                self.path(ConvAlgo::Direct, h, w, cin)
            }
            p => p,
        }
    }

    /// The SGEMM backend for this dispatch: ours on AVX2 (0.92-1.29x
    /// OpenBLAS, BENCHMARKS.md 7.3); the `gemm` crate on AVX-512 (its
    /// 16-wide kernels measured 1.02-1.43x OpenBLAS there, where ours has
    /// only an 8-wide one) and on the portable ISA (tuned kernels for more
    /// targets than ours). `VGG16_ISA=avx2` on an AVX-512 machine runs ours.
    pub fn gemm_backend(&self) -> Backend {
        match self.isa {
            Isa::Avx2 => Backend::OwnAvx2,
            Isa::Avx512 | Isa::Generic => Backend::Gemm,
        }
    }

    /// One line for the start of a run, e.g.
    /// `conv: direct avx2 (> 4x4), tap classes (<= 4x4); gemm: own-avx2; cpu: AMD EPYC (avx2, fma)`.
    pub fn describe(&self) -> String {
        let name = |p: ConvPath| match p {
            ConvPath::Direct(isa) => format!("direct {}", isa.name()),
            ConvPath::Winograd(isa) => format!("winograd F(4,3) {}", isa.name()),
            p => p.name().replace('_', " "),
        };
        // The largest side still on tap classes (Winograd may start below
        // SMALL_SIDE).
        let small = (1..=SMALL_SIDE)
            .rev()
            .find(|&s| self.path(ConvAlgo::Auto, s, s, 64) == ConvPath::TapClasses)
            .unwrap_or(0);
        let s = SMALL_SIDE + 1;
        let (rgb, big) = (self.path(ConvAlgo::Auto, s, s, 3), self.path(ConvAlgo::Auto, s, s, 64));
        let big = if rgb == big {
            name(big)
        } else {
            format!("{} (RGB layer: {})", name(big), name(rgb))
        };
        let forced: Vec<String> = [
            std::env::var("VGG16_ISA").ok().map(|v| format!("VGG16_ISA={v}")),
            std::env::var("VGG16_CONV").ok().map(|v| format!("VGG16_CONV={v}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        let forced = if forced.is_empty() {
            String::new()
        } else {
            format!(" [forced: {}]", forced.join(" "))
        };
        format!(
            "conv: {big} (> {s}x{s}), tap classes (<= {s}x{s}); gemm: {}; cpu: {} ({}){forced}",
            self.gemm_backend().name(),
            cpu_model(),
            cpu_features(),
            s = small
        )
    }
}

/// The CPU's model name (from /proc/cpuinfo on Linux), or the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The SIMD features the engine looks for, those this CPU has.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut v = Vec::new();
        if std::is_x86_feature_detected!("avx512f") {
            v.push("avx512f");
        }
        if std::is_x86_feature_detected!("avx2") {
            v.push("avx2");
        }
        if std::is_x86_feature_detected!("fma") {
            v.push("fma");
        }
        if v.is_empty() {
            v.push("sse2");
        }
        v.join(", ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_backend_per_isa() {
        let on = |isa| {
            Dispatch {
                isa,
                conv: ConvAlgo::Auto,
            }
            .gemm_backend()
        };
        assert_eq!(on(Isa::Avx2), Backend::OwnAvx2);
        // AVX-512 keeps the gemm crate's 16-wide kernels; the portable
        // ISA the crate's tuned ones.
        assert_eq!(on(Isa::Avx512), Backend::Gemm);
        assert_eq!(on(Isa::Generic), Backend::Gemm);
    }

    #[test]
    fn parses_and_refuses_forced_paths() {
        let d = Dispatch::from_vars(None, None).unwrap();
        assert_eq!(d, Dispatch::detected());
        let g = Dispatch::from_vars(Some("generic"), Some("im2col")).unwrap();
        assert_eq!((g.isa, g.conv), (Isa::Generic, ConvAlgo::Im2col));
        assert_eq!(
            Dispatch::from_vars(Some(" AVX2 "), None).map(|d| d.isa).ok(),
            Isa::Avx2.supported().then_some(Isa::Avx2)
        );
        assert_eq!(
            Dispatch::from_vars(Some("sse9"), None),
            Err(DispatchError::UnknownIsa("sse9".into()))
        );
        assert_eq!(
            Dispatch::from_vars(None, Some("fft")),
            Err(DispatchError::UnknownConv("fft".into()))
        );
        for isa in Isa::ALL.into_iter().filter(|i| !i.supported()) {
            let e = Dispatch::from_vars(Some(isa.name()), None).unwrap_err();
            assert!(matches!(e, DispatchError::UnsupportedIsa(..)), "{e}");
        }
    }

    #[test]
    fn picks_paths_by_side_and_isa() {
        for isa in Isa::ALL {
            let d = Dispatch {
                isa,
                conv: ConvAlgo::Auto,
            };
            // Small images take tap classes, whatever is asked, except
            // Winograd's from WINOGRAD_MIN_SIDE (one whole output tile).
            for algo in [ConvAlgo::Auto, ConvAlgo::Direct, ConvAlgo::Im2col, ConvAlgo::Winograd] {
                assert_eq!(d.path(algo, 3, 4, 64), ConvPath::TapClasses);
                assert_eq!(d.path(algo, 1, 2, 3), ConvPath::TapClasses);
                assert_eq!(d.path(algo, 4, 4, 3), ConvPath::TapClasses, "RGB: no Winograd");
            }
            assert_eq!(d.path(ConvAlgo::Winograd, 4, 4, 64), ConvPath::Winograd(isa));
            assert_eq!(d.path(ConvAlgo::Direct, 4, 4, 64), ConvPath::TapClasses);
            assert_eq!(d.path(ConvAlgo::Im2col, 4, 4, 64), ConvPath::TapClasses);
            let auto4 = d.path(ConvAlgo::Auto, 4, 4, 64);
            match isa {
                Isa::Generic => assert_eq!(auto4, ConvPath::TapClasses),
                _ => assert_eq!(auto4, ConvPath::Winograd(isa)),
            }
            // Too few tiles for a kernel transform: back to tap classes.
            assert_eq!(d.path_unprepared(ConvAlgo::Auto, 8, 4, 4, 64), ConvPath::TapClasses);
            assert_eq!(d.path(ConvAlgo::Direct, 5, 4, 64), ConvPath::Direct(isa));
            assert_eq!(d.path(ConvAlgo::Im2col, 224, 224, 64), ConvPath::Im2col);
            assert_eq!(d.path(ConvAlgo::Winograd, 14, 14, 512), ConvPath::Winograd(isa));
            // The RGB layer never takes Winograd.
            assert_eq!(d.path(ConvAlgo::Winograd, 224, 224, 3), ConvPath::Direct(isa));
            let (auto, rgb) = (d.path(ConvAlgo::Auto, 14, 14, 512), d.path(ConvAlgo::Auto, 224, 224, 3));
            match isa {
                Isa::Generic => assert_eq!((auto, rgb), (ConvPath::Im2col, ConvPath::Im2col)),
                Isa::Avx2 | Isa::Avx512 => assert_eq!((auto, rgb), (ConvPath::Winograd(isa), ConvPath::Direct(isa))),
            }
            // A call that transforms its own kernel: Winograd only with
            // enough tiles to pay for the transform; forced paths kept.
            let small = d.path_unprepared(ConvAlgo::Auto, 1, 14, 14, 512);
            let big = d.path_unprepared(ConvAlgo::Auto, 2, 14, 14, 512);
            match isa {
                Isa::Generic => assert_eq!((small, big), (ConvPath::Im2col, ConvPath::Im2col)),
                _ => assert_eq!((small, big), (ConvPath::Direct(isa), ConvPath::Winograd(isa))),
            }
            assert_eq!(
                d.path_unprepared(ConvAlgo::Auto, 1, 56, 56, 256),
                d.path(ConvAlgo::Auto, 56, 56, 256)
            );
            assert_eq!(
                d.path_unprepared(ConvAlgo::Winograd, 1, 14, 14, 512),
                ConvPath::Winograd(isa)
            );
            let forced = Dispatch {
                isa,
                conv: ConvAlgo::Winograd,
            };
            assert_eq!(
                forced.path_unprepared(ConvAlgo::Auto, 1, 14, 14, 512),
                ConvPath::Winograd(isa)
            );
            // A forced algorithm is what Auto resolves to.
            let f = Dispatch {
                isa,
                conv: ConvAlgo::Im2col,
            };
            assert_eq!(f.path(ConvAlgo::Auto, 14, 14, 64), ConvPath::Im2col);
            assert_eq!(f.path(ConvAlgo::Direct, 14, 14, 64), ConvPath::Direct(isa));
        }
    }
}
