//! The generator as the commands use it: [`LoadedGenerator`] loads its
//! weights with the standardization file beside them, [`generate`] runs it
//! in device batches, [`init_weights`] writes seeded random (untrained)
//! weights for examples.

use std::path::{Path, PathBuf};

use super::features::{FeatureColumns, FeatureTable, NanPolicy, Standardizer};
use crate::backend::Backend;
use crate::io::TensorFile;
use crate::models::cp2image::{is_untrained, random_generator_weights, Generator, GeneratorConfig};
use crate::tensor::Tensor;
use crate::{Error, Result};

/// Which generator to load and how to run it.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorOptions {
    /// Generator weights (safetensors, PyTorch state_dict names).
    pub weights: PathBuf,
    /// Standardization file; `None`: `<weights stem>.standardize.json`
    /// beside the weights ([`Standardizer::default_path`]).
    pub standardize: Option<PathBuf>,
    /// Images per device batch.
    pub batch_size: usize,
    /// Missing feature values in the tables it reads: refused, or imputed by
    /// the training mean (a standardized 0).
    pub nan: NanPolicy,
}

/// What a command says about the generator it ran.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorInfo {
    /// Its hyper-parameters.
    pub config: GeneratorConfig,
    /// The weights' note when they are seeded random (untrained) weights.
    pub untrained: Option<String>,
}

/// A generator loaded with its standardization.
#[derive(Debug)]
pub struct LoadedGenerator {
    /// The generator.
    pub generator: Generator,
    /// The standardization of its inputs.
    pub standardizer: Standardizer,
    /// The weights' note when they are seeded random (untrained) weights.
    pub untrained: Option<String>,
    /// Images per device batch.
    pub batch_size: usize,
    /// Missing values in the tables it reads ([`GeneratorOptions::nan`]).
    pub nan: NanPolicy,
}

impl LoadedGenerator {
    /// Loads the weights onto `be` and reads the standardization file, which
    /// must exist and hold the generator's number of features.
    pub fn open(be: &Backend, o: &GeneratorOptions) -> Result<Self> {
        if o.batch_size == 0 {
            return Err(Error::invalid("--batch-size must be at least 1"));
        }
        let file = TensorFile::open(&o.weights)?;
        let untrained = is_untrained(&file).map(str::to_string);
        let generator = Generator::from_file(be, &file)?;
        let std_path = o
            .standardize
            .clone()
            .unwrap_or_else(|| Standardizer::default_path(&o.weights));
        if !std_path.is_file() {
            return Err(Error::invalid(format!(
                "no standardization file {}: create it with `cellmorph cp2image standardize --features TRAINING.csv --weights {}` or pass --standardize",
                std_path.display(),
                o.weights.display()
            )));
        }
        let standardizer = Standardizer::read(&std_path)?;
        standardizer
            .check_generator(generator.config().n_features)
            .map_err(|e| Error::format(&std_path, e.to_string()))?;
        Ok(LoadedGenerator {
            generator,
            standardizer,
            untrained,
            batch_size: o.batch_size,
            nan: o.nan,
        })
    }

    /// Reads a feature table with the generator's features, in its order;
    /// missing values as [`LoadedGenerator::nan`] says (imputed ones are
    /// reported on stderr).
    pub fn read_table(&self, path: &Path) -> Result<FeatureTable> {
        let (table, missing) = FeatureTable::read_csv_with(
            path,
            FeatureColumns::Named(&self.standardizer.features),
            self.nan,
            Some(&self.standardizer.mean),
        )?;
        if let Some(line) = missing.describe() {
            eprintln!("{}: {line} (the training mean)", path.display());
        }
        Ok(table)
    }

    /// Runs the generator on standardized vectors `z` ([`generate`]).
    pub fn generate(&self, be: &Backend, z: &[f32]) -> Result<Vec<f32>> {
        generate(be, &self.generator, z, self.batch_size)
    }

    /// Values per generated image (`C · S · S`).
    pub fn image_len(&self) -> usize {
        let c = self.generator.config();
        c.out_channels * c.image_size() * c.image_size()
    }

    /// Its configuration and untrained note.
    pub fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            config: self.generator.config().clone(),
            untrained: self.untrained.clone(),
        }
    }
}

/// Runs the generator on standardized vectors `z` (`[rows, p]` row-major)
/// in batches of `batch`; returns the images `[rows, C, S, S]` row-major.
pub fn generate(be: &Backend, g: &Generator, z: &[f32], batch: usize) -> Result<Vec<f32>> {
    let p = g.config().n_features;
    if batch == 0 {
        return Err(Error::invalid("batch size must be at least 1"));
    }
    if !z.len().is_multiple_of(p) {
        return Err(Error::invalid(format!(
            "{} values are not whole feature vectors of length {p}",
            z.len()
        )));
    }
    let mut images = Vec::new();
    for chunk in z.chunks(batch * p) {
        let x = Tensor::from_slice(be, &[chunk.len() / p, p], chunk)?;
        images.extend(g.forward(be, &x)?.to_vec()?);
    }
    Ok(images)
}

/// What [`init_weights`] writes.
#[derive(Clone, Debug, PartialEq)]
pub struct InitWeightsOptions {
    /// Number of input features p.
    pub n_features: usize,
    /// Channels c0, …, cB.
    pub channels: Vec<usize>,
    /// Random seed.
    pub seed: u64,
    /// Output weights (safetensors).
    pub output: PathBuf,
}

/// `cellmorph cp2image init-weights`: writes a generator with seeded random
/// (UNTRAINED) weights and 3 output channels
/// ([`random_generator_weights`]); returns its configuration.
pub fn init_weights(o: &InitWeightsOptions) -> Result<GeneratorConfig> {
    let config = GeneratorConfig {
        n_features: o.n_features,
        channels: o.channels.clone(),
        out_channels: 3,
    };
    random_generator_weights(&config, o.seed)?.write(&o.output)?;
    Ok(config)
}
