//! The synthetic data set (src/apps/expression/synth.rs): determinism, file
//! layout, and that the signal genes really carry the hidden factors.

use std::path::{Path, PathBuf};

use cellmorph::apps::expression::synth::{
    generate, SynthConfig, SynthFormat, SynthTruth, EXPRESSION_CSV, SAMPLES_CSV, TRUTH_JSON,
};
use cellmorph::imaging::{read_gray, read_sample_list, BitDepth};
use cellmorph::plot::{heatmap_overlay, heatmap_size, HeatmapOptions};
use cellmorph::rng::SplitMix64;
use cellmorph::table::Table;

/// A fresh, empty directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("cellmorph-synth-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        samples: 5,
        images_per_sample: 2,
        width: 96,
        height: 80,
        genes: 20,
        signal_genes: 6,
        ..SynthConfig::default()
    }
}

/// Every file under `dir`, relative, sorted, with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_path_buf();
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn splitmix64_matches_the_reference_sequence() {
    // First outputs of the reference C implementation for seed 0.
    let mut rng = SplitMix64::new(0);
    assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    assert_eq!(rng.next_u64(), 0x06C4_5D18_8009_454F);
}

#[test]
fn poisson_and_normal_draws_have_the_right_moments() {
    let seed = 7;
    println!("seed {seed}");
    let mut rng = SplitMix64::new(seed);
    let n = 40_000;
    for lambda in [0.5, 4.0, 29.0, 30.0, 500.0] {
        let draws: Vec<f64> = (0..n).map(|_| rng.poisson(lambda) as f64).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        // 5 standard errors of the mean (sd √λ/√n); variance within 5 %.
        let se = (lambda / n as f64).sqrt();
        assert!((mean - lambda).abs() < 5.0 * se, "λ {lambda}: mean {mean}");
        assert!(
            (var / lambda - 1.0).abs() < 0.05,
            "λ {lambda}: variance {var}"
        );
    }
    let z: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let mean = z.iter().sum::<f64>() / n as f64;
    let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    assert!(mean.abs() < 5.0 / (n as f64).sqrt(), "normal mean {mean}");
    assert!((var - 1.0).abs() < 0.05, "normal variance {var}");
}

#[test]
fn the_same_seed_writes_identical_files_and_another_seed_does_not() {
    let (a, b, c) = (scratch("det-a"), scratch("det-b"), scratch("det-c"));
    generate(&small(11), &a.0).unwrap();
    generate(&small(11), &b.0).unwrap();
    generate(&small(12), &c.0).unwrap();
    let (sa, sb, sc) = (snapshot(&a.0), snapshot(&b.0), snapshot(&c.0));
    assert_eq!(sa.len(), 10 + 3);
    assert!(sa == sb, "two runs with seed 11 differ");
    for ((name, bytes_a), (_, bytes_c)) in sa.iter().zip(&sc) {
        if name != Path::new(SAMPLES_CSV) {
            assert_ne!(
                bytes_a,
                bytes_c,
                "{} does not depend on the seed",
                name.display()
            );
        }
    }
}

#[test]
fn the_files_describe_one_consistent_data_set() {
    let dir = scratch("layout");
    let cfg = small(3);
    let out = generate(&cfg, &dir.0).unwrap();
    assert_eq!(out.samples_csv, dir.0.join(SAMPLES_CSV));

    let list = read_sample_list(&out.samples_csv).unwrap();
    assert_eq!(list, out.images);
    assert_eq!(list.len(), cfg.samples * cfg.images_per_sample);
    for entry in &list {
        let img = read_gray(&entry.path).unwrap();
        assert_eq!((img.width(), img.height()), (cfg.width, cfg.height));
        assert_eq!(img.depth(), BitDepth::Eight);
    }

    let table = Table::read_csv(dir.0.join(EXPRESSION_CSV)).unwrap();
    assert_eq!((table.n_rows(), table.n_cols()), (cfg.samples, cfg.genes));
    assert!(table.data.iter().all(|&v| v >= 0.0 && v.fract() == 0.0));

    let truth = SynthTruth::read(dir.0.join(TRUTH_JSON)).unwrap();
    assert_eq!(truth, out.truth);
    assert_eq!(truth.config, cfg);
    assert_eq!(truth.signal_genes.len(), cfg.signal_genes);
    assert_eq!(truth.noise_genes.len(), cfg.genes - cfg.signal_genes);
    let mut genes: Vec<&str> = truth.signal_genes.iter().map(|g| g.gene.as_str()).collect();
    genes.extend(truth.noise_genes.iter().map(String::as_str));
    genes.sort_unstable();
    let mut columns: Vec<&str> = table.col_names.iter().map(String::as_str).collect();
    columns.sort_unstable();
    assert_eq!(genes, columns);
    for (s, row) in truth.samples.iter().zip(&table.row_names) {
        assert_eq!(&s.sample, row);
        assert!(s.factors.iter().all(|f| (-1.0..=1.0).contains(f)));
    }
    // Signal genes are spread over the three factors in turn.
    let per_factor: Vec<usize> = (0..3)
        .map(|k| truth.signal_genes.iter().filter(|g| g.factor == k).count())
        .collect();
    assert_eq!(per_factor, [2, 2, 2]);
}

#[test]
fn tiff_output_is_16_bit() {
    let dir = scratch("tiff");
    let cfg = SynthConfig {
        format: SynthFormat::Tiff16,
        samples: 2,
        images_per_sample: 1,
        ..small(5)
    };
    let out = generate(&cfg, &dir.0).unwrap();
    for entry in &out.images {
        assert_eq!(entry.path.extension().unwrap(), "tif");
        let img = read_gray(&entry.path).unwrap();
        assert_eq!(img.depth(), BitDepth::Sixteen);
        // Real 16-bit data, not 8-bit values in a 16-bit container.
        assert!(img.data().iter().any(|&p| p % 257 != 0));
    }
}

#[test]
fn impossible_configurations_are_refused() {
    let dir = scratch("refuse");
    for cfg in [
        SynthConfig {
            signal_genes: 30,
            ..small(1)
        },
        SynthConfig {
            width: 8,
            ..small(1)
        },
        SynthConfig {
            samples: 0,
            ..small(1)
        },
        SynthConfig {
            noise_gene_sd: f64::NAN,
            ..small(1)
        },
    ] {
        assert!(generate(&cfg, &dir.0).is_err(), "{cfg:?}");
    }
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let syy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    sxy / (sxx * syy).sqrt()
}

#[test]
fn signal_genes_follow_their_factor_and_noise_genes_do_not() {
    let seed = 2024;
    println!("seed {seed}");
    let dir = scratch("signal");
    let cfg = SynthConfig {
        seed,
        samples: 40,
        images_per_sample: 1,
        width: 32,
        height: 32,
        genes: 60,
        signal_genes: 12,
        ..SynthConfig::default()
    };
    let out = generate(&cfg, &dir.0).unwrap();
    let table = Table::read_csv(&out.expression_csv).unwrap();
    // The pipeline's normalization: counts per million, then log2(x + 1).
    let mut logcpm = table.data.clone();
    for row in logcpm.chunks_mut(cfg.genes) {
        let total: f64 = row.iter().sum();
        for v in row.iter_mut() {
            *v = (*v / total * 1e6 + 1.0).log2();
        }
    }
    let column = |gene: &str| -> Vec<f64> {
        let c = table.col_index(gene).unwrap();
        logcpm.chunks(cfg.genes).map(|row| row[c]).collect()
    };
    let factor =
        |k: usize| -> Vec<f64> { out.truth.samples.iter().map(|s| s.factors[k]).collect() };

    // Expected |r| ≈ 0.9 (effect sd 0.46–0.87 log2 units against noise sd
    // 0.25); under no association P(|r| > 0.6) with 40 samples is ~1e-4.
    for g in &out.truth.signal_genes {
        let r = pearson(&column(&g.gene), &factor(g.factor));
        assert!(r.abs() > 0.6, "{} vs factor {}: r = {r}", g.gene, g.factor);
        assert_eq!(r.signum(), g.coefficient.signum(), "{}", g.gene);
    }
    // Under no association |r| with 40 samples averages about 0.13.
    let noise: Vec<f64> = out
        .truth
        .noise_genes
        .iter()
        .flat_map(|g| (0..3).map(move |k| (g, k)))
        .map(|(g, k)| pearson(&column(g), &factor(k)).abs())
        .collect();
    let mean_noise = noise.iter().sum::<f64>() / noise.len() as f64;
    assert!(mean_noise < 0.25, "noise genes: mean |r| = {mean_noise}");
}

#[test]
fn images_get_darker_and_busier_with_the_factors() {
    let seed = 99;
    println!("seed {seed}");
    let dir = scratch("morph");
    let cfg = SynthConfig {
        seed,
        samples: 30,
        images_per_sample: 1,
        width: 160,
        height: 160,
        genes: 3,
        signal_genes: 0,
        ..SynthConfig::default()
    };
    let out = generate(&cfg, &dir.0).unwrap();
    // Cell bodies are darker than the background (128 ± noise); the share of
    // dark pixels grows with cell size, density and darkness alike.
    let dark_share: Vec<f64> = out
        .images
        .iter()
        .map(|e| {
            let img = read_gray(&e.path).unwrap();
            let dark = img.data().iter().filter(|&&p| p < 100).count();
            dark as f64 / img.data().len() as f64
        })
        .collect();
    let combined: Vec<f64> = out
        .truth
        .samples
        .iter()
        .map(|s| s.factors.iter().sum())
        .collect();
    let r = pearson(&dark_share, &combined);
    assert!(r > 0.7, "dark share vs summed factors: r = {r}");
    // Each factor on its own explains only part of the variance, so check
    // each one's partial effect: every regression slope must be positive.
    let x: Vec<[f64; 4]> = out
        .truth
        .samples
        .iter()
        .map(|s| [1.0, s.factors[0], s.factors[1], s.factors[2]])
        .collect();
    let beta = least_squares(&x, &dark_share);
    println!("dark share = {beta:?} · [1, size, density, darkness]");
    assert!(beta[1..].iter().all(|&b| b > 0.0), "slopes {beta:?}");
}

/// Ordinary least squares with four regressors, by Gaussian elimination on
/// the normal equations (well conditioned here: independent uniform factors).
fn least_squares(x: &[[f64; 4]], y: &[f64]) -> [f64; 4] {
    let mut a = [[0.0; 5]; 4];
    for (row, &target) in x.iter().zip(y) {
        for i in 0..4 {
            for j in 0..4 {
                a[i][j] += row[i] * row[j];
            }
            a[i][4] += row[i] * target;
        }
    }
    for col in 0..4 {
        let pivot = (col..4)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap();
        a.swap(col, pivot);
        for r in 0..4 {
            if r != col {
                let f = a[r][col] / a[col][col];
                let pivot_row = a[col];
                for (dst, src) in a[r].iter_mut().zip(pivot_row).skip(col) {
                    *dst -= f * src;
                }
            }
        }
    }
    [0, 1, 2, 3].map(|i| a[i][4] / a[i][i])
}

#[test]
fn a_heat_map_over_a_synthetic_image_has_the_documented_size() {
    let dir = scratch("heat");
    let out = generate(&small(8), &dir.0).unwrap();
    let img = read_gray(&out.images[0].path).unwrap();
    let grid = img.patch_grid(32).unwrap();
    assert_eq!((grid.rows(), grid.cols()), (2, 3));
    let values: Vec<f64> = (0..grid.len()).map(|i| i as f64 * 0.5).collect();
    let path = dir.0.join("heat.png");
    let opts = HeatmapOptions {
        title: "Gene 1".into(),
        ..HeatmapOptions::default()
    };
    heatmap_overlay(&path, &img, &grid, &values, &opts).unwrap();
    let png = image::open(&path).unwrap();
    assert_eq!((png.width(), png.height()), heatmap_size(96, 80, &opts));
    assert_eq!((png.width(), png.height()), (96 + 90, 120 + 24));
}
