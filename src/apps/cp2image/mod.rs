//! CP2Image (Ji et al.) around the model ([`crate::models::cp2image`]):
//! single-cell images generated from CellProfiler features, the paper's
//! feature manipulation (Figure 4c) and interpolation (Figure 5a, 5c), and
//! contact sheets that put real crops beside generated images.
//!
//! Files:
//! - [`features`]: [`FeatureTable`](features::FeatureTable) reads a CSV of
//!   CellProfiler features, one row per cell: the first column names the row
//!   (`cell_id`), feature columns must hold finite numbers, and every other
//!   column (`field`, centroids) is kept as text. This is the layout of
//!   `shared/data/single_cells/features.csv`.
//!   [`Standardizer`](features::Standardizer): per-feature mean and standard
//!   deviation (population, as scikit-learn's `StandardScaler`; a zero
//!   deviation counts as 1), saved as JSON with the feature names, by default
//!   beside the generator's weights. The generator takes
//!   `z = (x − mean) / std`. [`standardize`](features::standardize) is
//!   `cellmorph cp2image standardize`.
//! - [`vectors`]: the feature vectors the figures are drawn from, in
//!   standardized units, and the cosine similarity that labels the
//!   interpolation steps.
//! - [`generator`]: the generator loaded with its standardization
//!   ([`LoadedGenerator`](generator::LoadedGenerator)) and run in device
//!   batches; [`init_weights`](generator::init_weights) writes seeded random
//!   weights (`cellmorph cp2image init-weights`).
//! - [`figures`]: the commands that draw —
//!   [`generate_images`](figures::generate_images),
//!   [`manipulate_feature`](figures::manipulate_feature),
//!   [`interpolate`](figures::interpolate) (`cellmorph cp2image generate`,
//!   `manipulate`, `interpolate`).
//! - [`sheets`]: [`CropSet`](sheets::CropSet) reads the real crops
//!   (`cells.safetensors`, tensor `crops` u8 `[N, C, S, S]`),
//!   [`Sheet`](sheets::Sheet) lays out rows of captioned tiles and writes a
//!   PNG; [`DisplayScale`](sheets::DisplayScale) maps channels to colours the
//!   way the data set's preview does (channel 0 → blue, 1 → green, 2 → red,
//!   each divided by its 99.5th percentile, for display only: the real crops
//!   by theirs and the generated images by theirs, since a generator's output
//!   range depends on how its training targets were scaled).
//!
//! # Examples on the real single-cell set
//!
//! `shared/data/single_cells` has p = 405 features per cell, and there is no
//! trained CP2Image generator with p = 405 (the fixture's has p = 32). The
//! examples therefore use a generator with seeded random weights
//! (`cp2image init-weights`, [`crate::models::cp2image::random_generator_weights`]):
//! the real features and crops go through the whole pipeline, but the
//! generated images are not predictions of how the cells look. Weights made
//! this way carry a metadata note, and every command that loads them says
//! so on stderr and in the contact sheet's title.
//!
//! ```text
//! D=tests/data/single_cells
//! cellmorph cp2image init-weights --features 405 --output g405.safetensors --seed 1
//! cellmorph cp2image standardize --features $D/features.csv --weights g405.safetensors
//! cellmorph cp2image generate --weights g405.safetensors --features $D/features.csv \
//!     --crops $D/cells.safetensors --limit 24 --output sheet.png
//! cellmorph cp2image manipulate --weights g405.safetensors --features $D/features.csv \
//!     --crops $D/cells.safetensors --feature Nuclei_AreaShape_Area --row 12 --output area.png
//! cellmorph cp2image interpolate --weights g405.safetensors --features $D/features.csv \
//!     --crops $D/cells.safetensors --from-row 4 --to-row 15 --output interp.png
//! cellmorph cp2image interpolate --weights g405.safetensors --features $D/features.csv \
//!     --crops $D/cells.safetensors --group-means --from-group 01_POS002 --to-group 01_POS218 \
//!     --output groups.png
//! ```

pub mod evaluate;
pub mod features;
pub mod figures;
pub mod generator;
pub mod sheets;
pub mod train;
pub mod vectors;
