//! The op tests, one binary (`cargo test --test ops`), one module per op
//! family, named like the family's files in `kernels/`, `src/ops/` and
//! `src/cpu/` (the ops table in `src/ops/mod.rs` maps every op to its
//! tests):
//!
//! - [`conv`]: conv2d (implicit GEMM and direct), conv_transpose2d; its
//!   submodule `conv::fused`: `conv2d_fused_into` (prologues, epilogues,
//!   channel slices);
//! - [`conv_backward`]: conv2d and conv_transpose2d backward (input, weight
//!   and bias gradients; determinism; PyTorch goldens on the emulated device);
//! - [`conv_tc`]: the tensor-core conv2d (bf16/f16 precisions);
//! - [`linear`]: the linear layer and its backward (on the conv kernels);
//! - [`activation`]: ReLU, LeakyReLU, sigmoid, add, softmax, dropout;
//! - [`norm`]: BatchNorm (plain and fused with ReLU; training mode and its
//!   backward);
//! - [`pool`]: max, average and global average pooling;
//! - [`layout`]: nearest ×2 upsampling, channel concatenation;
//! - [`vq`]: VQ lookup and code histograms.
//!
//! Each of those runs the kernels on the emulated device and (ignored
//! without a GPU, `--include-ignored` on one) on CUDA against the CPU path.
//! The CPU path itself is checked across families by [`golden`] (every
//! forward op against PyTorch goldens, `tests/fixtures/ops.safetensors`)
//! and [`backward`] (every backward op against finite differences) and
//! [`golden_backward`] (every backward op against PyTorch goldens,
//! `tests/fixtures/ops_backward.safetensors`).
//! [`support`] holds the helpers of activation, norm, pool and layout.

#[path = "../common/mod.rs"]
mod common;

mod support;

mod activation;
mod backward;
mod conv;
mod conv_backward;
mod conv_tc;
mod golden;
mod golden_backward;
mod layout;
mod linear;
mod norm;
mod pool;
mod vq;
