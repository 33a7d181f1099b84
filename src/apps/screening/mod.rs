//! Stem-cell line screening of Kim et al. 2022 ([reference](crate::reference) §2): live-cell
//! images → pre-processing → DenseNet → positive-class probability and
//! decision, class activation maps, pooled features; and the evaluation of
//! the predictions against labels.
//!
//! - [`preprocess`]: the paper's pre-processing of one image (value channel,
//!   brightness filter, intensity scaling, resize, [0, 1], gray to channels,
//!   optional ImageNet normalization).
//! - [`images`]: the images of a run, from a CSV list or a directory, and
//!   their reading and pre-processing on a second thread.
//! - [`predict`]: every image through a [`DenseNet`](crate::models::DenseNet)
//!   in batches while the next batch is read; unreadable or excluded images
//!   are skipped with a reason, never an error.
//! - [`cam`]: class activation maps over the network input, as PNG.
//! - [`saliency`]: Grad-CAM++ and VisualBackProp maps, as PNG overlays and
//!   16-bit PNG maps.
//! - [`files`]: the predictions CSV, which carries the run's timing in `#`
//!   comment lines; the labels CSV; the pooled features (CSV or
//!   safetensors).
//! - [`train`]: transfer learning of the network's head on cached pooled
//!   features (`screen train`), and the head-training core.
//! - [`tune`]: the hyper-parameter search of the head by Bayesian
//!   optimization (`screen tune`), every trial on the same cached features.
//! - [`report`]: ROC AUC, F1, accuracy, sensitivity, specificity, PPV, NPV,
//!   confusion matrix and throughput, as JSON and a ROC curve PNG.

pub mod cam;
pub mod files;
pub mod images;
pub mod predict;
pub mod preprocess;
pub mod report;
pub mod saliency;
pub mod train;
pub mod tune;
