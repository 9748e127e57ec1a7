//! Input: the CIFAR-10 reader, download, and VGG-16 preprocessing.

pub mod cifar;
pub mod fetch;
pub mod image;
