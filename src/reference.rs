//! The reference: architectures, tensor names and formulas the code relies on
//! (the text of `docs/MODELS.md`, so that `cargo doc` stands alone).
//!
// Shapes in the text such as `[out]` or `[n, K]` are not links.
#![allow(rustdoc::broken_intra_doc_links)]
#![doc = include_str!("../docs/MODELS.md")]
