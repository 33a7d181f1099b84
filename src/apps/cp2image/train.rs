//! `cellmorph cp2image train`: the CP2Image GAN trained from a feature
//! table and the real crops it describes, one generator and one
//! discriminator update per step ([`crate::train::cp2image`]) with Adam
//! (lr 2e-4, betas 0.5, 0.999 by default), on any device.
//!
//! Rows are split by a seeded shuffle into training and validation cells;
//! the standardization is fitted on the training rows and written beside
//! the generator. Each epoch visits the training rows in a new seeded
//! order (the last partial batch is dropped: training-mode BatchNorm needs
//! two or more cells); the discriminator's real batch is another seeded
//! order of the same rows. After each epoch: mean losses, the validation
//! MSE of the generator in inference mode (running statistics) against the
//! mean-training-image baseline, a CSV row, loss curves, a sheet of
//! held-out real cells above their generated images, and a checkpoint
//! (both networks, both optimizers, the progress). Every draw is keyed by
//! (seed, epoch, index), so a resumed run equals an unbroken one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::{TensorFile, TensorWriter};
use crate::models::cp2image::{
    random_discriminator_weights, random_generator_weights, Generator, GeneratorConfig,
};
use crate::plot::{line_plot, PlotOptions, Series};
use crate::rng::{counter_u64, fnv1a64};
use crate::tensor::Tensor;
use crate::train::checkpoint;
use crate::train::cp2image::{train_step_weighted_on, Batch, LossWeights, NetState};
use crate::train::{AdamConfig, Method, Optimizer};

use super::features::{FeatureTable, Standardizer};
use super::sheets::{CropSet, DisplayScale, Sheet, Tile};

const KEY_SPLIT: u64 = 0xc2_5917;
const KEY_ORDER: u64 = 0xc2_0bde;
const KEY_REAL: u64 = 0xc2_4ea1;

/// `cp2image train`'s options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Epochs (passes over the training rows).
    pub epochs: u64,
    /// Cells per step (at least 2).
    pub batch: usize,
    /// Adam's learning rate for both networks.
    pub lr: f64,
    /// Adam's (β1, β2).
    pub betas: (f64, f64),
    /// Seed of the weights, the split and the orders.
    pub seed: u64,
    /// Fraction of the rows held out.
    pub val_fraction: f64,
    /// Generator channels c0 … cB (the paper: 256, 128, 64, 32, 16).
    pub generator_channels: Vec<usize>,
    /// Discriminator block channels (the paper: 32, 64, 128, 256, 256).
    pub discriminator_channels: Vec<usize>,
    /// Held-out cells shown on the sheet.
    pub sheet_cells: usize,
    /// Weights of the generator's MSE, feature-matching and adversarial terms.
    pub loss_weights: LossWeights,
}

/// Where `cp2image train` writes.
#[derive(Clone, Debug)]
pub struct TrainPaths {
    /// Generator weights.
    pub generator: PathBuf,
    /// Discriminator weights.
    pub discriminator: PathBuf,
    /// The standardization fitted on the training rows.
    pub standardizer: PathBuf,
    /// Per-epoch metrics CSV.
    pub metrics: PathBuf,
    /// Loss curves PNG.
    pub curves: PathBuf,
    /// Held-out real vs generated PNG.
    pub sheet: PathBuf,
    /// The resumable checkpoint.
    pub checkpoint: PathBuf,
    /// Which rows were trained on and which held out (`id,split`), read by
    /// `cp2image evaluate`.
    pub split: PathBuf,
}

impl TrainPaths {
    /// Everything beside the generator `G.safetensors`:
    /// `G.discriminator.safetensors`, `G.standardize.json`,
    /// `G.metrics.csv`, `G.curves.png`, `G.sheet.png`,
    /// `G.checkpoint.safetensors`, `G.split.csv`.
    pub fn beside(generator: &Path) -> TrainPaths {
        let stem = generator
            .file_stem()
            .map_or_else(|| "cp2image".into(), |s| s.to_string_lossy().into_owned());
        let dir = generator.parent().unwrap_or(Path::new(""));
        TrainPaths {
            generator: generator.to_path_buf(),
            discriminator: dir.join(format!("{stem}.discriminator.safetensors")),
            standardizer: Standardizer::default_path(generator),
            metrics: dir.join(format!("{stem}.metrics.csv")),
            curves: dir.join(format!("{stem}.curves.png")),
            sheet: dir.join(format!("{stem}.sheet.png")),
            checkpoint: dir.join(format!("{stem}.checkpoint.safetensors")),
            split: dir.join(format!("{stem}.split.csv")),
        }
    }

    /// Every path with its role.
    pub fn all(&self) -> [(&'static str, &Path); 8] {
        [
            ("--output", &self.generator),
            ("--discriminator-output", &self.discriminator),
            ("standardization file", &self.standardizer),
            ("metrics CSV", &self.metrics),
            ("curves PNG", &self.curves),
            ("sheet PNG", &self.sheet),
            ("checkpoint", &self.checkpoint),
            ("split CSV", &self.split),
        ]
    }
}

/// One epoch's numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    /// 1-based epoch.
    pub epoch: u64,
    /// Mean generator loss over the epoch's steps.
    pub loss_g: f64,
    /// Mean discriminator loss.
    pub loss_d: f64,
    /// Pixel MSE of the generated held-out cells (inference mode).
    pub val_mse: f64,
    /// Pixel MSE of the mean training image on the held-out cells.
    pub val_mse_mean_image: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Progress {
    epoch: u64,
    options: TrainOptions,
    data: u64,
    rows: Vec<EpochRow>,
    counters_g: BTreeMap<String, i64>,
    counters_d: BTreeMap<String, i64>,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Every epoch's numbers.
    pub rows: Vec<EpochRow>,
    /// Training and held-out cells.
    pub cells: (usize, usize),
    /// The epoch the run started from.
    pub resumed_from: u64,
    /// Steps per second of this invocation.
    pub steps_per_s: f64,
}

/// A seeded permutation of `0..n` keyed by (`key`, `epoch`).
fn permutation(n: usize, key: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let r = counter_u64(key, epoch, i as u64);
        let j = ((u128::from(r) * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

fn subset(table: &FeatureTable, rows: &[usize]) -> Result<FeatureTable> {
    let mut values = Vec::with_capacity(rows.len() * table.n_features());
    for &r in rows {
        values.extend_from_slice(table.row(r)?);
    }
    Ok(FeatureTable {
        ids: rows.iter().map(|&r| table.ids[r].clone()).collect(),
        names: table.names.clone(),
        values,
        text_columns: Vec::new(),
    })
}

fn state_from(w: &TensorWriter, origin: &str) -> Result<NetState> {
    NetState::from_file(&TensorFile::from_bytes(origin, w.to_bytes()?)?, "")
}

fn check_options(o: &TrainOptions) -> Result<()> {
    let bad = |flag: &str, why: &str| Err(Error::invalid(format!("{flag} {why}")));
    if o.epochs == 0 {
        return bad("--epochs", "must be at least 1");
    }
    if o.batch < 2 {
        return bad(
            "--batch-size",
            "must be at least 2 (training-mode BatchNorm)",
        );
    }
    if !(o.lr.is_finite() && o.lr > 0.0) {
        return bad("--lr", "must be finite and positive");
    }
    if !(0.0..1.0).contains(&o.val_fraction) {
        return bad("--val-fraction", "must lie in [0, 1)");
    }
    let w = &o.loss_weights;
    if [w.mse, w.feature_matching, w.adversarial]
        .iter()
        .any(|v| !(v.is_finite() && *v >= 0.0))
    {
        return bad(
            "--mse-weight/--feature-matching-weight/--adversarial-weight",
            "must be finite and ≥ 0",
        );
    }
    if o.generator_channels.len() != 5 || o.discriminator_channels.len() != 5 {
        return bad(
            "--generator-channels/--discriminator-channels",
            "need five numbers each (64×64 cells: 4 generator blocks, 5 discriminator blocks)",
        );
    }
    Ok(())
}

/// Trains on `table` (raw features, one row per cell, ids = crop indices)
/// and `crops` on `be`'s device (f32; the steps of
/// [`crate::train::cp2image`] and the held-out evaluation run there); see
/// the module documentation.
pub fn train(
    be: &Backend,
    table: &FeatureTable,
    crops: &CropSet,
    resume: Option<&Path>,
    opts: &TrainOptions,
    paths: &TrainPaths,
    show_progress: bool,
) -> Result<TrainSummary> {
    check_options(opts)?;
    if crops.size != 64 {
        return Err(Error::invalid(format!(
            "the crops are {0}×{0}; CP2Image makes 64×64 cells",
            crops.size
        )));
    }
    let crop_of: Vec<usize> = table
        .ids
        .iter()
        .map(|id| crops.index_of(id))
        .collect::<Result<_>>()?;
    let n = table.n_rows();
    let order = permutation(n, opts.seed ^ KEY_SPLIT, 0);
    let n_val = if opts.val_fraction > 0.0 {
        ((n as f64 * opts.val_fraction).round() as usize).max(1)
    } else {
        0
    };
    let (val_rows, train_rows) = order.split_at(n_val.min(n));
    let mut train_rows = train_rows.to_vec();
    train_rows.sort_unstable();
    let mut val_rows = val_rows.to_vec();
    val_rows.sort_unstable();
    if train_rows.len() < opts.batch {
        return Err(Error::invalid(format!(
            "{} training cells are fewer than one batch of {}; lower --batch-size or --val-fraction",
            train_rows.len(),
            opts.batch
        )));
    }
    let standardizer = Standardizer::fit(&subset(table, &train_rows)?)?;
    let z_all = standardizer.apply_table(table)?;
    let p = table.n_features();
    let (ch, size) = (crops.channels, crops.size);
    let cell_len = ch * size * size;
    let cell = |r: usize| crops.crop(crop_of[r]);

    let gcfg = GeneratorConfig {
        n_features: p,
        channels: opts.generator_channels.clone(),
        out_channels: ch,
    };
    let mut dch = vec![ch];
    dch.extend_from_slice(&opts.discriminator_channels);
    let mut g = state_from(&random_generator_weights(&gcfg, opts.seed)?, "generator")?;
    let mut d = state_from(
        &random_discriminator_weights(&dch, opts.seed)?,
        "discriminator",
    )?;
    let adam = Method::Adam(AdamConfig {
        betas: opts.betas,
        ..AdamConfig::default()
    });
    let (mut og, mut od) = (Optimizer::new(adam)?, Optimizer::new(adam)?);
    g.params.register(&mut og)?;
    d.params.register(&mut od)?;

    let data = fnv1a64(&format!(
        "{}|{}|{:?}|{}",
        table.ids.join(","),
        table.names.join(","),
        crops.pixels.len(),
        n
    ));
    let mut progress = Progress {
        epoch: 0,
        options: opts.clone(),
        data,
        rows: Vec::new(),
        counters_g: g.num_batches_tracked.clone(),
        counters_d: d.num_batches_tracked.clone(),
    };
    if let Some(ck) = resume {
        let saved = checkpoint::load_parts(
            ck,
            &mut [
                ("G.", &mut g.params, &mut og),
                ("D.", &mut d.params, &mut od),
            ],
        )?;
        let saved: Progress = serde_json::from_value(saved)
            .map_err(|e| Error::format(ck, format!("checkpoint progress: {e}")))?;
        if saved.data != data {
            return Err(Error::format(
                ck,
                "the checkpoint was made on other features or crops",
            ));
        }
        let same = TrainOptions {
            epochs: opts.epochs,
            ..saved.options.clone()
        };
        if &same != opts {
            return Err(Error::format(
                ck,
                format!(
                    "the checkpoint was made with other options ({:?}); only --epochs may change on resume",
                    saved.options
                ),
            ));
        }
        let steps = saved.epoch * (train_rows.len() / opts.batch) as u64;
        checkpoint::check_steps(ck, &og, steps)?;
        checkpoint::check_steps(ck, &od, steps)?;
        checkpoint::check_counters(ck, &saved.counters_g, &g.num_batches_tracked)?;
        checkpoint::check_counters(ck, &saved.counters_d, &d.num_batches_tracked)?;
        g.num_batches_tracked = saved.counters_g.clone();
        d.num_batches_tracked = saved.counters_d.clone();
        progress = Progress {
            options: opts.clone(),
            ..saved
        };
    }
    let resumed_from = progress.epoch;

    // Held-out cells and the mean-training-image baseline.
    let mut mean_image = vec![0.0f64; cell_len];
    for &r in &train_rows {
        for (m, v) in mean_image.iter_mut().zip(cell(r)?) {
            *m += f64::from(v);
        }
    }
    mean_image
        .iter_mut()
        .for_each(|m| *m /= train_rows.len() as f64);
    let shown: Vec<usize> = if val_rows.is_empty() {
        train_rows.iter().take(opts.sheet_cells).copied().collect()
    } else {
        val_rows.iter().take(opts.sheet_cells).copied().collect()
    };

    let steps_per_epoch = train_rows.len() / opts.batch;
    let bar = crate::apps::progress_bar((opts.epochs * steps_per_epoch as u64).max(1), "steps");
    bar.set_position(progress.epoch * steps_per_epoch as u64);
    if !show_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = Instant::now();
    let shape = [opts.batch, ch, size, size];
    while progress.epoch < opts.epochs {
        let e = progress.epoch;
        let order = permutation(train_rows.len(), opts.seed ^ KEY_ORDER, e);
        let real = permutation(train_rows.len(), opts.seed ^ KEY_REAL, e);
        let (mut sum_g, mut sum_d) = (0.0f64, 0.0f64);
        for s in 0..steps_per_epoch {
            let (mut z, mut x, mut x_real) = (Vec::new(), Vec::new(), Vec::new());
            for j in s * opts.batch..(s + 1) * opts.batch {
                let r = train_rows[order[j]];
                z.extend_from_slice(&z_all[r * p..(r + 1) * p]);
                x.extend(cell(r)?);
                x_real.extend(cell(train_rows[real[j]])?);
            }
            let l = train_step_weighted_on(
                be,
                &mut g,
                &mut d,
                &mut og,
                &mut od,
                opts.lr,
                &Batch {
                    z: &z,
                    x: &x,
                    x_real: &x_real,
                    shape,
                },
                &opts.loss_weights,
            )?;
            if !(l.loss_g.is_finite() && l.loss_d.is_finite()) {
                return Err(Error::invalid(format!(
                    "the losses became {} / {} in epoch {}; try a lower --lr",
                    l.loss_g,
                    l.loss_d,
                    e + 1
                )));
            }
            sum_g += f64::from(l.loss_g);
            sum_d += f64::from(l.loss_d);
            bar.inc(1);
            bar.set_message(format!("G {:.4} D {:.4}", l.loss_g, l.loss_d));
        }
        progress.epoch += 1;

        // Evaluation in inference mode on the held-out cells.
        let gw = generator_writer(&g, opts, &standardizer)?;
        let model = Generator::from_file(
            be,
            &TensorFile::from_bytes(&paths.generator, gw.to_bytes()?)?,
        )?;
        let eval_rows = if val_rows.is_empty() {
            &train_rows
        } else {
            &val_rows
        };
        let (mut mse, mut mse_mean) = (0.0f64, 0.0f64);
        let mut generated_shown = Vec::new();
        for chunk in eval_rows.chunks(64) {
            let mut z = Vec::with_capacity(chunk.len() * p);
            for &r in chunk {
                z.extend_from_slice(&z_all[r * p..(r + 1) * p]);
            }
            let out = model
                .forward(be, &Tensor::from_vec(be, &[chunk.len(), p], z)?)?
                .to_vec()?;
            for (k, &r) in chunk.iter().enumerate() {
                let real = cell(r)?;
                let fake = &out[k * cell_len..(k + 1) * cell_len];
                for ((&a, &b), &m) in fake.iter().zip(&real).zip(&mean_image) {
                    mse += f64::from(a - b).powi(2);
                    mse_mean += (m - f64::from(b)).powi(2);
                }
                if shown.contains(&r) {
                    generated_shown.push((r, fake.to_vec()));
                }
            }
        }
        let denom = (eval_rows.len() * cell_len) as f64;
        let row = EpochRow {
            epoch: progress.epoch,
            loss_g: sum_g / steps_per_epoch as f64,
            loss_d: sum_d / steps_per_epoch as f64,
            val_mse: mse / denom,
            val_mse_mean_image: mse_mean / denom,
        };
        bar.suspend(|| {
            eprintln!(
                "epoch {}: loss G {:.5}, D {:.5}; held-out MSE {:.5} (mean image {:.5})",
                row.epoch, row.loss_g, row.loss_d, row.val_mse, row.val_mse_mean_image
            )
        });
        progress.rows.push(row);
        progress.counters_g = g.num_batches_tracked.clone();
        progress.counters_d = d.num_batches_tracked.clone();
        write_reports(
            paths,
            &progress.rows,
            crops,
            &shown,
            &generated_shown,
            &table.ids,
        )?;
        let value = serde_json::to_value(&progress)
            .map_err(|e| Error::invalid(format!("checkpoint progress: {e}")))?;
        checkpoint::save_parts(
            &paths.checkpoint,
            &[("G.", &g.params, &og), ("D.", &d.params, &od)],
            &value,
        )?;
    }
    bar.finish_and_clear();

    standardizer.write(&paths.standardizer)?;
    let mut split = crate::csv::CsvWriter::new();
    split.record(["id", "split"]);
    for (r, id) in table.ids.iter().enumerate() {
        let which = if val_rows.binary_search(&r).is_ok() {
            "val"
        } else {
            "train"
        };
        split.record([id.as_str(), which]);
    }
    split.write(&paths.split)?;
    generator_writer(&g, opts, &standardizer)?.write(&paths.generator)?;
    let mut dw = TensorWriter::new();
    d.write_values(&mut dw, "")?;
    dw.set_metadata(
        "cellmorph",
        &format!(
            "CP2Image discriminator trained by cellmorph cp2image train ({} epochs)",
            opts.epochs
        ),
    );
    dw.write(&paths.discriminator)?;
    let steps = (opts.epochs - resumed_from) * steps_per_epoch as u64;
    Ok(TrainSummary {
        rows: progress.rows,
        cells: (train_rows.len(), val_rows.len()),
        resumed_from,
        steps_per_s: steps as f64 / started.elapsed().as_secs_f64().max(1e-9),
    })
}

fn generator_writer(g: &NetState, opts: &TrainOptions, s: &Standardizer) -> Result<TensorWriter> {
    let mut w = TensorWriter::new();
    g.write_values(&mut w, "")?;
    w.set_metadata(
        "cellmorph",
        &format!(
            "CP2Image generator trained by cellmorph cp2image train: {} epochs, batch {}, Adam lr {} betas {:?}, seed {}, {} features, loss weights {:?}",
            opts.epochs,
            opts.batch,
            opts.lr,
            opts.betas,
            opts.seed,
            s.len(),
            opts.loss_weights
        ),
    );
    Ok(w)
}

fn write_reports(
    paths: &TrainPaths,
    rows: &[EpochRow],
    crops: &CropSet,
    shown: &[usize],
    generated: &[(usize, Vec<f32>)],
    ids: &[String],
) -> Result<()> {
    let mut csv = String::from("epoch,loss_g,loss_d,val_mse,val_mse_mean_image\n");
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            r.epoch, r.loss_g, r.loss_d, r.val_mse, r.val_mse_mean_image
        ));
    }
    crate::io::write_atomic(&paths.metrics, csv.as_bytes())?;
    let x: Vec<f64> = rows.iter().map(|r| r.epoch as f64).collect();
    let series = |label: &str, y: Vec<f64>| Series {
        label: label.into(),
        x: x.clone(),
        y,
    };
    line_plot(
        &paths.curves,
        &[
            series("generator", rows.iter().map(|r| r.loss_g).collect()),
            series("discriminator", rows.iter().map(|r| r.loss_d).collect()),
            series(
                "held-out MSE x100",
                rows.iter().map(|r| 100.0 * r.val_mse).collect(),
            ),
        ],
        &PlotOptions {
            title: "CP2Image training".into(),
            x_label: "epoch".into(),
            y_label: "loss".into(),
            width: 640,
            height: 400,
        },
    )?;
    // One scale for both rows: each channel stretched to the shown real
    // cells' 99.5th percentile (the cells are dim on the full range).
    let indices = shown
        .iter()
        .map(|&r| crops.index_of(&ids[r]))
        .collect::<Result<Vec<usize>>>()?;
    let scale = DisplayScale::from_crops(crops, &indices, 99.5)?;
    let mut real_row = Vec::new();
    let mut fake_row = Vec::new();
    for &r in shown {
        let crop_index = crops.index_of(&ids[r])?;
        real_row.push(Tile {
            image: scale.render(&crops.crop(crop_index)?, crops.size, 2)?,
            caption: ids[r].clone(),
        });
        if let Some((_, fake)) = generated.iter().find(|(g, _)| *g == r) {
            fake_row.push(Tile {
                image: scale.render(fake, crops.size, 2)?,
                caption: ids[r].clone(),
            });
        }
    }
    Sheet {
        title: vec![format!(
            "epoch {}: held-out real cells (top) and the generator's images from their features (bottom)",
            rows.len()
        )],
        rows: vec![("real".into(), real_row), ("generated".into(), fake_row)],
    }
    .save(&paths.sheet)
}
