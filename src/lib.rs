//! vgg16-cpu: VGG-16 transfer learning on plain multicore CPUs.
//!
//! The numeric core is an im2col + SGEMM convolution engine over NHWC `f32`
//! ndarrays ([`tensor`]), parallelised with rayon over fixed partitions so
//! results do not depend on the thread count.

pub mod optim;
pub mod tensor;
