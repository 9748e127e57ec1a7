//! Tells the tests what this checkout has beside it, so a test that cannot
//! run here is reported as *ignored* in the test summary (with the reason)
//! instead of passing without having checked anything:
//! - `has_shared`: `../shared/` with the development data, weights and
//!   fixtures (parity, the shared archive);
//! - `has_weights`: the ImageNet base, in `weights/` (what `vgg16 weights
//!   fetch` writes) or in `../shared/weights/`.
//!
//! Only paths that exist are watched (cargo reruns a build script on every
//! build when a watched path is missing); after adding `../shared` to an
//! existing checkout, `touch build.rs` once.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_shared)");
    println!("cargo::rustc-check-cfg=cfg(has_weights)");
    println!("cargo::rerun-if-changed=build.rs");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared");
    let has_shared = shared.join("weights").is_dir() && shared.join("data").is_dir();
    let weights = [
        root.join("weights/vgg16_imagenet_notop.npz"),
        shared.join("weights/vgg16_imagenet_notop.npz"),
    ];
    for w in ["weights", "../shared/weights", "../shared/data", "../shared/fixtures"] {
        if root.join(w).exists() {
            println!("cargo::rerun-if-changed={w}");
        }
    }
    if has_shared {
        println!("cargo::rustc-cfg=has_shared");
    }
    if weights.iter().any(|p| p.is_file()) {
        println!("cargo::rustc-cfg=has_weights");
    }
}
