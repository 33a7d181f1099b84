//! The three applications, one folder each, built on the models and ops.
//!
//! - [`expression`]: expression from morphology (Wakui et al. 2023).
//! - [`screening`]: stem-cell line screening with DenseNet (Kim et al. 2022).
//! - [`cp2image`]: single-cell images from CellProfiler features (Ji et al.).

pub mod cp2image;
pub mod expression;
pub mod screening;
