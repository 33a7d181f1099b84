//! The whole expression-from-morphology pipeline on a generated data set with
//! known truth: synthetic images and expression → an (untrained) VQ-VAE-2 →
//! profiles → per-gene SVR grid search on one batch → Table-3 evaluation on
//! the same batch and on a held-out batch → a patch-wise map, with scatter
//! plots of the best genes and the map drawn over its image. This is the
//! README's main job (`cellmorph demo`, [`run_demo`]) and the end-to-end
//! test.

use std::path::{Path, PathBuf};

use super::evaluate::{evaluate, Dataset, Evaluation};
use super::init::{random_vqvae2, seed_codebooks};
use super::map::{expression_map, ExpressionMap};
use super::plots::{map_png, scatter_top};
use super::prepare::{ExpressionTable, GeneFilter, Scale};
use super::profile::{profile_samples, ProfileOptions};
use super::synth::{generate, SynthConfig, SynthTruth};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::imaging::{read_gray, PatchStream, SampleImage};
use crate::io::TensorFile;
use crate::models::vqvae2::{VqVae2, VqVae2Config};
use crate::svr::{grid_search_on, GridSpec, SvrModel};
use crate::table::Table;
use crate::tensor::Tensor;

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// The synthetic data set (its samples are split in two batches).
    pub synth: SynthConfig,
    /// Size of the untrained VQ-VAE-2 (the paper's by default).
    pub vqvae: VqVae2Config,
    /// The SVR grid (the paper's by default).
    pub grid: GridSpec,
    /// Patch side.
    pub patch: usize,
    /// Patches per device batch.
    pub batch: usize,
    /// Patches used to seed the codebooks.
    pub seed_patches: usize,
    /// FDR level.
    pub fdr: f64,
    /// Show progress bars.
    pub progress: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            synth: SynthConfig {
                samples: 48,
                images_per_sample: 1,
                ..SynthConfig::default()
            },
            vqvae: VqVae2Config {
                in_channel: 1,
                channel: 128,
                n_res_block: 2,
                n_res_channel: 32,
                embed_dim: 64,
                n_embed: 64,
            },
            grid: GridSpec::paper(),
            patch: 160,
            batch: 16,
            seed_patches: 48,
            fdr: 0.05,
            progress: true,
        }
    }
}

impl DemoConfig {
    /// The small grid of `cellmorph demo --quick`: C 1, 10, 100 × ε 0, 0.1,
    /// 0.2 instead of the paper's 1,100 settings.
    pub fn quick_grid() -> Result<GridSpec> {
        GridSpec::parse("1,10,100", "0:0.2:0.1")
    }
}

/// Everything the demo produced.
#[derive(Debug)]
pub struct DemoResult {
    /// Output folder.
    pub dir: PathBuf,
    /// The generated data's truth.
    pub truth: SynthTruth,
    /// Evaluation on the training batch ("A") and the held-out batch ("B").
    pub evaluation: Evaluation,
    /// A patch-wise map of the best gene on the first held-out image.
    pub map: Option<ExpressionMap>,
    /// Paths of the data files written, with a word on each.
    pub files: Vec<(PathBuf, &'static str)>,
    /// The folder of the plots (`plots/` in the output folder).
    pub plot_dir: PathBuf,
    /// Predicted-vs-measured scatter plots of the top 3 genes of each batch.
    pub plots: Vec<PathBuf>,
    /// The map drawn over its image, `plots/map_<gene>.png`.
    pub map_png: Option<PathBuf>,
}

/// How the held-out batch's significant genes match the truth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TruthCheck {
    /// Signal genes significant on the held-out batch.
    pub signal_significant: usize,
    /// Signal genes evaluated on it.
    pub signal: usize,
    /// Noise genes significant on it.
    pub noise_significant: usize,
    /// Noise genes evaluated on it.
    pub noise: usize,
}

impl DemoResult {
    /// Counts the significant signal and noise genes on the held-out batch
    /// ("B …") against the truth.
    pub fn truth_check(&self) -> TruthCheck {
        let signal: Vec<&str> = self
            .truth
            .signal_genes
            .iter()
            .map(|g| g.gene.as_str())
            .collect();
        let held: Vec<_> = self
            .evaluation
            .results
            .iter()
            .filter(|r| r.dataset.starts_with('B'))
            .collect();
        let hit = |want_signal: bool| {
            let set: Vec<_> = held
                .iter()
                .filter(|r| signal.contains(&r.gene.as_str()) == want_signal)
                .collect();
            (set.iter().filter(|r| r.significant).count(), set.len())
        };
        let (signal_significant, signal) = hit(true);
        let (noise_significant, noise) = hit(false);
        TruthCheck {
            signal_significant,
            signal,
            noise_significant,
            noise,
        }
    }
}

fn say(progress: bool, msg: &str) {
    if progress {
        eprintln!("{msg}");
    }
}

/// Runs the demo into `dir` on `be`.
pub fn run_demo(be: &Backend, cfg: &DemoConfig, dir: &Path) -> Result<DemoResult> {
    let mut files = Vec::new();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

    // 1. Data: one synthetic set, split into two batches of samples.
    say(cfg.progress, "1/6 generating the synthetic data set");
    let data = generate(&cfg.synth, dir.join("data"))?;
    files.push((data.samples_csv.clone(), "sample list (sample, image)"));
    files.push((data.expression_csv.clone(), "raw counts (samples × genes)"));
    files.push((data.truth_json.clone(), "hidden factors and signal genes"));
    let names: Vec<String> = data
        .truth
        .samples
        .iter()
        .map(|s| s.sample.clone())
        .collect();
    let half = names.len() / 2;
    let (train, test) = names.split_at(half);
    let images_of = |set: &[String]| -> Vec<SampleImage> {
        data.images
            .iter()
            .filter(|i| set.contains(&i.sample))
            .cloned()
            .collect()
    };

    // 2. An untrained VQ-VAE-2 with codebooks seeded on patches of batch A.
    say(
        cfg.progress,
        "2/6 building an UNTRAINED VQ-VAE-2 (seeded random weights, k-means++ codebooks)",
    );
    let weights = dir.join("vqvae2_untrained.safetensors");
    let raw = dir.join("vqvae2_random.safetensors");
    random_vqvae2(&cfg.vqvae, cfg.synth.seed)?.write(&raw)?;
    let patches = seed_patch_batch(be, &images_of(train), cfg.patch, cfg.seed_patches)?;
    seed_codebooks(
        be,
        &TensorFile::open(&raw)?,
        &patches,
        cfg.synth.seed,
        &weights,
    )?;
    let _ = std::fs::remove_file(&raw);
    files.push((weights.clone(), "untrained VQ-VAE-2 weights"));
    let vq = VqVae2::load(be, &weights)?;

    // 3. Profiles of both batches.
    say(cfg.progress, "3/6 profiling both batches");
    let opts = ProfileOptions {
        patch: cfg.patch,
        batch: cfg.batch,
        mse: false,
        progress: cfg.progress,
    };
    let mut profiles = Vec::new();
    for (label, set) in [("A", train), ("B", test)] {
        let report = profile_samples(be, &vq, &images_of(set), opts)?;
        for s in &report.skipped {
            say(
                cfg.progress,
                &format!("  skipped {}: {}", s.path.display(), s.reason),
            );
        }
        let t = report.to_table()?;
        let path = dir.join(format!("profiles_{label}.csv"));
        t.write_csv(&path)?;
        files.push((path, "code-frequency profiles"));
        profiles.push(t);
    }

    // 4. Expression: log2 CPM of every gene that varies, split like the samples.
    say(cfg.progress, "4/6 normalizing expression (CPM, log2)");
    let counts = Table::read_csv(&data.expression_csv)?;
    let e = ExpressionTable::new(
        counts.row_names,
        counts.col_names,
        counts.data,
        Scale::RawCounts,
    )?
    .normalize()?;
    let kept = e.filter_genes(&GeneFilter {
        min_mean: 0.0,
        min_cv: 0.0,
    })?;
    let e = e.select_genes(&kept.kept)?;
    let expr = Table::new(
        e.samples().to_vec(),
        e.genes().to_vec(),
        e.values().to_vec(),
    )?;
    let expr_a = expr.select_rows(train)?;
    let expr_b = expr.select_rows(test)?;

    // 5. Per-gene SVR grid search on batch A.
    say(
        cfg.progress,
        &format!(
            "5/6 SVR grid search on batch A: {} genes × {} settings × {} folds",
            expr_a.n_cols(),
            cfg.grid.n_settings(),
            cfg.grid.folds
        ),
    );
    let outcome = grid_search_on(be, &profiles[0], &expr_a, &cfg.grid)?;
    let chosen: Vec<(&str, f64, f64)> = outcome
        .results
        .iter()
        .map(|r| (r.gene.as_str(), r.c, r.epsilon))
        .collect();
    let warnings = crate::svr::grid_edge_warnings(&cfg.grid, &chosen);
    let model = SvrModel::from_grid(profiles[0].col_names.clone(), &outcome.results)
        .with_training(&profiles[0].select_rows(&expr_a.row_names)?, warnings)?;
    let model_path = dir.join("model.json");
    model.save(&model_path)?;
    files.push((model_path, "per-gene SVR models"));

    // 6. Evaluate on A (training fit) and B (held-out batch), then a map.
    say(cfg.progress, "6/6 evaluating and mapping");
    let evaluation = evaluate(
        &model,
        &[
            Dataset {
                name: "A (train)".into(),
                features: profiles[0].clone(),
                expression: expr_a,
            },
            Dataset {
                name: "B (held out)".into(),
                features: profiles[1].clone(),
                expression: expr_b,
            },
        ],
        cfg.fdr,
    )?;
    let eval_path = dir.join("evaluation.csv");
    evaluation.write_csv(&eval_path)?;
    files.push((eval_path, "R², p, q, r2_score per gene and batch"));
    let best = evaluation
        .top("B (held out)", 1)
        .first()
        .map(|r| r.gene.clone());
    let first_test_image = images_of(test).into_iter().next();
    let map = match (best, first_test_image) {
        (Some(gene), Some(img)) => Some(expression_map(
            be, &vq, &model, &gene, &img.path, cfg.patch, cfg.batch,
        )?),
        _ => None,
    };

    // Plots: the top genes' scatter plots, the map over its image.
    let plot_dir = dir.join("plots");
    let plots = scatter_top(&evaluation, 3, &plot_dir, Some("log2 CPM"))?;
    let mut map_file = None;
    if let Some(m) = &map {
        let img = data
            .truth
            .samples
            .iter()
            .skip(data.truth.samples.len() / 2)
            .find_map(|s| s.images.first())
            .map(|rel| dir.join("data").join(rel));
        if let Some(img) = img {
            let path = plot_dir.join(format!("map_{}.png", m.gene));
            map_png(m, &img, &path)?;
            map_file = Some(path);
        }
    }
    Ok(DemoResult {
        dir: dir.to_path_buf(),
        truth: data.truth,
        evaluation,
        map,
        files,
        plot_dir,
        plots,
        map_png: map_file,
    })
}

/// Up to `max` patches from the images, in list order, as one tensor.
fn seed_patch_batch(
    be: &Backend,
    images: &[SampleImage],
    patch: usize,
    max: usize,
) -> Result<Tensor> {
    let mut data = Vec::new();
    let mut n = 0;
    for item in images {
        if n >= max {
            break;
        }
        let img = read_gray(&item.path)?;
        let mut stream = PatchStream::new(&img, patch, max - n)?;
        if let Some(b) = stream.next_batch()? {
            data.extend_from_slice(b.data);
            n += b.indices.len();
        }
    }
    if n == 0 {
        return Err(Error::invalid("no patch to seed the codebooks from"));
    }
    Tensor::from_vec(be, &[n, 1, patch, patch], data)
}
