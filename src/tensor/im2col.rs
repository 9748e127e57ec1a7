//! im2col for 3x3 "same" convolutions over NHWC input: one row per output
//! pixel, its 9 taps' Cin channels side by side (zeros off the edge). Used
//! by the im2col + GEMM path and the dW pass (the direct kernel reads the
//! few-channel RGB layer in place, as rows of three pixels).

/// Fills `col` (rows, 9*cin) with the im2col rows of output pixels
/// `p0 .. p0+rows` (NHWC order) of `x` (n, h, w, cin), zero padding 1.
pub fn im2col(x: &[f32], h: usize, w: usize, cin: usize, p0: usize, rows: usize, col: &mut [f32]) {
    let k = 9 * cin;
    debug_assert!(col.len() >= rows * k);
    for (r, row) in col[..rows * k].chunks_exact_mut(k).enumerate() {
        let g = p0 + r;
        let img = g / (h * w);
        let rem = g % (h * w);
        let (y, xx) = (rem / w, rem % w);
        let base = img * h * w * cin;
        for ky in 0..3 {
            let iy = y as isize + ky as isize - 1;
            for kx in 0..3 {
                let ix = xx as isize + kx as isize - 1;
                let dst = &mut row[(ky * 3 + kx) * cin..(ky * 3 + kx + 1) * cin];
                if iy < 0 || iy >= h as isize || ix < 0 || ix >= w as isize {
                    dst.fill(0.0);
                } else {
                    let src = base + (iy as usize * w + ix as usize) * cin;
                    let src = &x[src..src + cin];
                    if cin < 16 {
                        // A few channels (the RGB input): a plain loop beats
                        // a memcpy call per tap.
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = v;
                        }
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            }
        }
    }
}
