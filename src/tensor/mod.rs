//! The numeric engine: GEMM, 3x3 convolution, and the other layers.

pub mod conv;
pub mod direct;
pub mod dispatch;
pub mod gemm;
pub mod im2col;
pub mod ops;
pub mod pool;
pub mod sgemm;
pub mod winograd;
