//! Expression from morphology (Wakui et al. 2023, [reference](crate::reference) §1):
//! phase-contrast images → 160×160 patches → VQ-VAE-2 codes → per-sample
//! code-frequency profiles → per-gene linear SVR with a cross-validated grid
//! search → predicted expression, Table-3-style evaluation, patch-wise
//! expression maps; and the demo that runs all of it on synthetic data with
//! known truth.
//!
//! Files:
//! - [`synth`]: the synthetic data set with known truth (`cellmorph synth`).
//! - [`prepare`]: expression tables — `log2(CPM + 1)` and the mean/CV gene
//!   filter (`cellmorph expression prepare`).
//! - [`profile`]: images → per-sample profiles (`cellmorph profile`).
//! - [`init`]: an untrained VQ-VAE-2 (seeded weights, k-means++ codebooks).
//! - [`gene_models`]: the per-gene SVR grid search and prediction from files
//!   (`cellmorph svr grid`, `cellmorph svr predict`).
//! - [`batch`]: per-batch centring/scaling of feature tables (`--batch-correct`).
//! - [`cv`]: cross-validated predictions and their scores (`cellmorph svr cv`).
//! - [`categories`]: sample categories with an RBF SVM (`cellmorph svm
//!   grid`, `cellmorph svm predict`).
//! - [`evaluate`]: the Table-3 evaluation (`cellmorph expression evaluate`).
//! - [`map`]: patch-wise expression maps (`cellmorph map`).
//! - [`plots`]: scatter plots of the best genes, maps over their images.
//! - [`tiles`]: labelled images → tiles with mask-derived targets
//!   (`cellmorph expression tiles`).
//! - [`demo`]: the whole pipeline on synthetic data (`cellmorph demo`).
//! - [`tsne`]: t-SNE of a feature table with a coloured scatter plot
//!   (`cellmorph tsne`).
//! - [`cluster`]: Ward clustering of samples or features, dendrogram and
//!   heat map (`cellmorph cluster`).

pub mod batch;
pub mod categories;
pub mod cluster;
pub mod cv;
pub mod demo;
pub mod evaluate;
pub mod gene_models;
pub mod init;
pub mod map;
pub mod plots;
pub mod prepare;
pub mod profile;
pub mod synth;
pub mod tiles;
pub mod train;
pub mod tsne;
