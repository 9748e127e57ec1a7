//! The network: VGG-16's layer table and weights ([`vgg`]), conv parameters
//! in `.npz` ([`params`]), block5 and the transfer head as forward /
//! backward pairs ([`block5`], [`head`]), the saved model ([`saved`]), the
//! ImageNet weights' import from ONNX ([`onnx_import`]) and the Keras-style
//! summary ([`summary`]).

pub mod block5;
pub mod head;
pub mod onnx_import;
pub mod params;
pub mod saved;
pub mod summary;
pub mod vgg;

pub use block5::{
    block5_backward, block5_backward_each, block5_features, block5_forward, Block5Acts, Block5Infer, Block5Kernels,
};
pub use head::{head_backward, head_forward, Dense, Head, HeadActs, Norm};
