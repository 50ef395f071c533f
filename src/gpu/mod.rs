//! The CUDA side of the host runtime: the bindings of csrc/braidinfer.h, the device, and safe
//! wrappers of every kernel.

pub mod device;
pub mod ffi;
pub mod kernels;

pub use device::Gpu;
