//! Gene-expression tables ([reference](crate::reference) §1 "Expression data"): samples × genes,
//! normalized to `log2(CPM + 1)` and filtered by each gene's mean and
//! coefficient of variation.
//!
//! The paper does not say which standard deviation its coefficient of
//! variation uses; this module takes the sample standard deviation
//! (`ddof = 1`, the pandas default): `cv = std / mean`.
//!
//! [`prepare_counts`] is `cellmorph expression prepare`; [`read_expression`]
//! reads the expression CSV the other commands take.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::table::Table;

/// What the values of an [`ExpressionTable`] currently are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Raw read counts (non-negative).
    RawCounts,
    /// Counts per million: each sample scaled to a total of 1e6.
    Cpm,
    /// `log2(CPM + 1)`, the normalized form the models use. Construct a table
    /// with this scale for input that is already normalized.
    Log2Cpm,
}

/// A samples × genes matrix of expression values with sample and gene names.
///
/// Values are stored row-major: sample `s`, gene `g` is at `s * n_genes + g`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpressionTable {
    samples: Vec<String>,
    genes: Vec<String>,
    values: Vec<f64>,
    scale: Scale,
}

/// Per-gene statistics across samples.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneStats {
    /// Gene name.
    pub gene: String,
    /// Mean over samples.
    pub mean: f64,
    /// Sample standard deviation (`ddof = 1`).
    pub std: f64,
    /// Coefficient of variation `std / mean`; `None` when `mean <= 0`, where
    /// it is undefined.
    pub cv: Option<f64>,
}

/// Thresholds a gene must reach to be kept (both inclusive).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeneFilter {
    /// Keep genes with `mean >= min_mean`.
    pub min_mean: f64,
    /// Keep genes with `std / mean >= min_cv`.
    pub min_cv: f64,
}

/// Why a gene was dropped, checked in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The gene has the same value in every sample: it carries no signal
    /// (and a model cannot be fitted to it).
    ZeroVariance,
    /// `mean < min_mean`.
    LowMean,
    /// `mean <= 0`, so the coefficient of variation is undefined.
    UndefinedCv,
    /// `cv < min_cv`.
    LowCv,
}

/// A dropped gene and the first reason it failed.
#[derive(Clone, Debug, PartialEq)]
pub struct DroppedGene {
    /// Gene name.
    pub gene: String,
    /// Why it was dropped.
    pub reason: DropReason,
}

/// The outcome of [`ExpressionTable::filter_genes`].
#[derive(Clone, Debug, PartialEq)]
pub struct GeneFilterReport {
    /// Names of the genes kept, in table order.
    pub kept: Vec<String>,
    /// Genes dropped, in table order, with the reason.
    pub dropped: Vec<DroppedGene>,
    /// Statistics of every gene, in table order.
    pub stats: Vec<GeneStats>,
}

/// Checks that `names` are non-empty strings without duplicates.
fn check_names(kind: &str, names: &[String]) -> Result<()> {
    if names.is_empty() {
        return Err(Error::invalid(format!(
            "expression table: no {kind}s given"
        )));
    }
    let mut seen = HashSet::with_capacity(names.len());
    for name in names {
        if name.is_empty() {
            return Err(Error::invalid(format!(
                "expression table: a {kind} has an empty name"
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(Error::invalid(format!(
                "expression table: {kind} '{name}' appears more than once"
            )));
        }
    }
    Ok(())
}

impl ExpressionTable {
    /// A table from sample names, gene names and row-major values
    /// (`samples.len() × genes.len()`), at the given scale.
    ///
    /// # Errors
    /// Empty or duplicate names, a value count that does not match, a
    /// non-finite value, or a negative value on the `RawCounts` or `Cpm`
    /// scale (each naming the sample and gene).
    pub fn new(
        samples: Vec<String>,
        genes: Vec<String>,
        values: Vec<f64>,
        scale: Scale,
    ) -> Result<Self> {
        check_names("sample", &samples)?;
        check_names("gene", &genes)?;
        let expected = samples.len().checked_mul(genes.len());
        if expected != Some(values.len()) {
            return Err(Error::shape(
                "ExpressionTable::new",
                format!(
                    "{} samples × {} genes need {} values, got {}",
                    samples.len(),
                    genes.len(),
                    samples.len().saturating_mul(genes.len()),
                    values.len()
                ),
            ));
        }
        let table = ExpressionTable {
            samples,
            genes,
            values,
            scale,
        };
        let must_be_non_negative = scale != Scale::Log2Cpm;
        for (i, &v) in table.values.iter().enumerate() {
            if !v.is_finite() || (must_be_non_negative && v < 0.0) {
                let what = if v.is_finite() {
                    format!("negative value {v} on the {scale:?} scale")
                } else {
                    format!("non-finite value {v}")
                };
                return Err(Error::invalid(format!(
                    "expression table: {what} at {}",
                    table.locate(i)
                )));
            }
        }
        Ok(table)
    }

    /// "sample 'S', gene 'G'" for the flat index `i` (in range by construction).
    fn locate(&self, i: usize) -> String {
        let n_genes = self.genes.len();
        let sample = self.samples.get(i / n_genes).map_or("?", String::as_str);
        let gene = self.genes.get(i % n_genes).map_or("?", String::as_str);
        format!("sample '{sample}', gene '{gene}'")
    }

    /// Sample names, one per row.
    pub fn samples(&self) -> &[String] {
        &self.samples
    }

    /// Gene names, one per column.
    pub fn genes(&self) -> &[String] {
        &self.genes
    }

    /// All values, row-major (samples × genes).
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// The scale the values are on.
    pub fn scale(&self) -> Scale {
        self.scale
    }

    /// Number of samples (rows).
    pub fn n_samples(&self) -> usize {
        self.samples.len()
    }

    /// Number of genes (columns).
    pub fn n_genes(&self) -> usize {
        self.genes.len()
    }

    /// Column index of the gene called `name`.
    pub fn gene_index(&self, name: &str) -> Option<usize> {
        self.genes.iter().position(|g| g == name)
    }

    /// The values of gene column `gene` over all samples, or `None` when out of
    /// range.
    pub fn gene_values(&self, gene: usize) -> Option<Vec<f64>> {
        if gene >= self.genes.len() {
            return None;
        }
        Some(
            self.values
                .iter()
                .skip(gene)
                .step_by(self.genes.len())
                .copied()
                .collect(),
        )
    }

    /// The same table with values replaced (the shape is unchanged).
    fn with_values(&self, values: Vec<f64>, scale: Scale) -> Self {
        ExpressionTable {
            samples: self.samples.clone(),
            genes: self.genes.clone(),
            values,
            scale,
        }
    }

    /// Counts per million: every value divided by its sample's total count
    /// and multiplied by 1e6.
    ///
    /// # Errors
    /// The table is not on the `RawCounts` scale, or a sample's total is zero
    /// (naming the sample).
    pub fn to_cpm(&self) -> Result<Self> {
        if self.scale != Scale::RawCounts {
            return Err(Error::invalid(format!(
                "expression table: counts per million need raw counts, but the table is on the {:?} scale",
                self.scale
            )));
        }
        let mut values = Vec::with_capacity(self.values.len());
        for (row, name) in self.values.chunks(self.genes.len()).zip(&self.samples) {
            let total: f64 = row.iter().sum();
            if total <= 0.0 {
                return Err(Error::invalid(format!(
                    "expression table: sample '{name}' has a total count of zero, so counts per million are undefined"
                )));
            }
            let scale = 1e6 / total;
            values.extend(row.iter().map(|v| v * scale));
        }
        Ok(self.with_values(values, Scale::Cpm))
    }

    /// The table on the `Log2Cpm` scale: raw counts go through counts per
    /// million then `log2(x + 1)`, CPM values through `log2(x + 1)`, and an
    /// already normalized table is returned unchanged (never normalized twice).
    ///
    /// # Errors
    /// As [`ExpressionTable::to_cpm`] for raw counts.
    pub fn normalize(&self) -> Result<Self> {
        let cpm = match self.scale {
            Scale::Log2Cpm => return Ok(self.clone()),
            Scale::Cpm => self.clone(),
            Scale::RawCounts => self.to_cpm()?,
        };
        let values = cpm
            .values
            .iter()
            .map(|v| v.ln_1p() / std::f64::consts::LN_2);
        Ok(self.with_values(values.collect(), Scale::Log2Cpm))
    }

    /// Mean, sample standard deviation and coefficient of variation of every
    /// gene, in table order.
    ///
    /// # Errors
    /// Fewer than two samples (the sample standard deviation needs two).
    pub fn gene_stats(&self) -> Result<Vec<GeneStats>> {
        let n = self.samples.len();
        if n < 2 {
            return Err(Error::invalid(format!(
                "expression table: gene statistics need at least 2 samples, got {n}"
            )));
        }
        let mut stats = Vec::with_capacity(self.genes.len());
        for (j, gene) in self.genes.iter().enumerate() {
            let column = self.gene_values(j).unwrap_or_default();
            let mean = column.iter().sum::<f64>() / n as f64;
            let ss: f64 = column.iter().map(|v| (v - mean) * (v - mean)).sum();
            let std = (ss / (n - 1) as f64).sqrt();
            stats.push(GeneStats {
                gene: gene.clone(),
                mean,
                std,
                cv: (mean > 0.0).then(|| std / mean),
            });
        }
        Ok(stats)
    }

    /// Which genes pass `filter`. A gene is kept when it varies across
    /// samples, `mean >= min_mean` and `std / mean >= min_cv`; every other
    /// gene is listed in `dropped` with the first check it failed (zero
    /// variance, low mean, undefined CV, low CV). Apply it with
    /// [`ExpressionTable::select_genes`]`(&report.kept)`.
    ///
    /// # Errors
    /// A non-finite threshold, or fewer than two samples.
    pub fn filter_genes(&self, filter: &GeneFilter) -> Result<GeneFilterReport> {
        if !(filter.min_mean.is_finite() && filter.min_cv.is_finite()) {
            return Err(Error::invalid(format!(
                "gene filter: thresholds must be finite, got min_mean = {}, min_cv = {}",
                filter.min_mean, filter.min_cv
            )));
        }
        let stats = self.gene_stats()?;
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for (j, s) in stats.iter().enumerate() {
            // Exact constancy, not `std == 0`: the mean of equal values can
            // round so that the computed deviations are tiny but non-zero.
            let constant = self
                .gene_values(j)
                .is_none_or(|c| c.windows(2).all(|w| w[0] == w[1]));
            let reason = if constant {
                Some(DropReason::ZeroVariance)
            } else if s.mean < filter.min_mean {
                Some(DropReason::LowMean)
            } else {
                match s.cv {
                    None => Some(DropReason::UndefinedCv),
                    Some(cv) if cv < filter.min_cv => Some(DropReason::LowCv),
                    Some(_) => None,
                }
            };
            match reason {
                Some(reason) => dropped.push(DroppedGene {
                    gene: s.gene.clone(),
                    reason,
                }),
                None => kept.push(s.gene.clone()),
            }
        }
        Ok(GeneFilterReport {
            kept,
            dropped,
            stats,
        })
    }

    /// A table with only the named genes, in the order given.
    ///
    /// # Errors
    /// An unknown or repeated gene name, or no names.
    pub fn select_genes<S: AsRef<str>>(&self, names: &[S]) -> Result<Self> {
        let mut columns = Vec::with_capacity(names.len());
        for name in names {
            let name = name.as_ref();
            let j = self.gene_index(name).ok_or_else(|| {
                Error::invalid(format!("expression table: no gene named '{name}'"))
            })?;
            columns.push(j);
        }
        let genes: Vec<String> = names.iter().map(|n| n.as_ref().to_string()).collect();
        check_names("gene", &genes)?;
        let n_genes = self.genes.len();
        let mut values = Vec::with_capacity(self.samples.len() * columns.len());
        for row in self.values.chunks(n_genes) {
            values.extend(columns.iter().filter_map(|&j| row.get(j)));
        }
        Ok(ExpressionTable {
            samples: self.samples.clone(),
            genes,
            values,
            scale: self.scale,
        })
    }
}

/// What [`prepare_counts`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareCountsOptions {
    /// Expression CSV: sample, then one column per gene.
    pub counts: PathBuf,
    /// The table is already normalized (log2 CPM): only filter.
    pub normalized: bool,
    /// The genes to keep.
    pub filter: GeneFilter,
    /// Output CSV of the kept genes, log2 CPM.
    pub output: PathBuf,
}

/// What [`prepare_counts`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PrepareCountsSummary {
    /// The genes of the input table.
    pub genes: usize,
    /// The kept and the dropped genes.
    pub report: GeneFilterReport,
}

/// `cellmorph expression prepare`: raw counts → counts per million →
/// `log2(x + 1)` (unless already normalized), then the mean/CV gene
/// filter; writes the kept genes. Fails when no gene passes.
pub fn prepare_counts(o: &PrepareCountsOptions) -> Result<PrepareCountsSummary> {
    let t = Table::read_csv(&o.counts)?;
    let scale = if o.normalized {
        Scale::Log2Cpm
    } else {
        Scale::RawCounts
    };
    let e = ExpressionTable::new(t.row_names, t.col_names, t.data, scale)?.normalize()?;
    let report = e.filter_genes(&o.filter)?;
    if report.kept.is_empty() {
        return Err(Error::invalid(format!(
            "no gene passes the filter (mean ≥ {}, CV ≥ {}): all {} genes dropped",
            o.filter.min_mean,
            o.filter.min_cv,
            e.n_genes()
        )));
    }
    let kept = e.select_genes(&report.kept)?;
    Table::new(
        kept.samples().to_vec(),
        kept.genes().to_vec(),
        kept.values().to_vec(),
    )?
    .write_csv(&o.output)?;
    Ok(PrepareCountsSummary {
        genes: e.n_genes(),
        report,
    })
}

/// Reads an expression CSV (samples × genes), normalizing raw counts to
/// `log2(CPM + 1)` when `raw_counts` says it holds them.
pub fn read_expression(path: &Path, raw_counts: bool) -> Result<Table> {
    let t = Table::read_csv(path)?;
    if !raw_counts {
        return Ok(t);
    }
    let e = ExpressionTable::new(
        t.row_names.clone(),
        t.col_names.clone(),
        t.data.clone(),
        Scale::RawCounts,
    )?
    .normalize()?;
    Table::new(
        e.samples().to_vec(),
        e.genes().to_vec(),
        e.values().to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    /// 3 samples × 4 genes of raw counts.
    fn counts() -> ExpressionTable {
        #[rustfmt::skip]
        let values = vec![
            10.0, 0.0, 90.0, 900.0,
            20.0, 0.0, 80.0, 100.0,
            30.0, 0.0, 70.0, 400.0,
        ];
        ExpressionTable::new(names("S", 3), names("G", 4), values, Scale::RawCounts).unwrap()
    }

    #[test]
    fn cpm_scales_each_sample_to_a_million() {
        let cpm = counts().to_cpm().unwrap();
        assert_eq!(cpm.scale(), Scale::Cpm);
        for row in cpm.values().chunks(4) {
            let total: f64 = row.iter().sum();
            assert!((total - 1e6).abs() <= 1e-9 * 1e6, "row total {total}");
        }
        // Sample 0 totals 1000: 10 reads → 10 000 CPM.
        assert!((cpm.values()[0] - 1e4).abs() <= 1e-9);
    }

    #[test]
    fn normalize_is_log2_cpm_plus_one_and_idempotent() {
        let t = counts();
        let norm = t.normalize().unwrap();
        let cpm = t.to_cpm().unwrap();
        for (n, c) in norm.values().iter().zip(cpm.values()) {
            // ln_1p / ln 2 against log2(x + 1): equal to a few ulps.
            assert!((n - (c + 1.0).log2()).abs() <= 1e-14 * n.abs().max(1.0));
        }
        assert_eq!(norm.scale(), Scale::Log2Cpm);
        assert_eq!(norm.normalize().unwrap(), norm);
        // From CPM, the same values as from counts.
        assert_eq!(cpm.normalize().unwrap(), norm);
        assert!(norm.to_cpm().is_err());
    }

    #[test]
    fn zero_total_sample_is_named() {
        let t = ExpressionTable::new(
            vec!["good".into(), "empty".into()],
            names("G", 2),
            vec![1.0, 2.0, 0.0, 0.0],
            Scale::RawCounts,
        )
        .unwrap();
        let err = t.normalize().unwrap_err().to_string();
        assert!(err.contains("'empty'"), "{err}");
    }

    #[test]
    fn constructor_validates() {
        let bad_shape =
            ExpressionTable::new(names("S", 2), names("G", 2), vec![1.0; 3], Scale::Cpm);
        assert!(bad_shape.is_err());
        let err = ExpressionTable::new(
            names("S", 2),
            names("G", 2),
            vec![1.0, 1.0, -1.0, 1.0],
            Scale::RawCounts,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("'S1'") && err.contains("'G0'"), "{err}");
        // Negative values are fine once normalized (user-supplied scales).
        let ok = ExpressionTable::new(
            names("S", 2),
            names("G", 1),
            vec![-1.0, 1.0],
            Scale::Log2Cpm,
        );
        assert!(ok.is_ok());
        let nan =
            ExpressionTable::new(names("S", 1), names("G", 1), vec![f64::NAN], Scale::Log2Cpm);
        assert!(nan.is_err());
        let dup = ExpressionTable::new(
            names("S", 1),
            vec!["A".into(), "A".into()],
            vec![1.0; 2],
            Scale::Cpm,
        );
        assert!(dup.is_err());
        assert!(ExpressionTable::new(vec![], names("G", 1), vec![], Scale::Cpm).is_err());
    }

    #[test]
    fn gene_stats_use_sample_std() {
        // Column [1, 2, 3, 6]: mean 3, sample variance (4 + 1 + 0 + 9) / 3.
        let t = ExpressionTable::new(
            names("S", 4),
            names("G", 1),
            vec![1.0, 2.0, 3.0, 6.0],
            Scale::Log2Cpm,
        )
        .unwrap();
        let s = &t.gene_stats().unwrap()[0];
        assert_eq!(s.mean, 3.0);
        let std = (14.0_f64 / 3.0).sqrt();
        assert!((s.std - std).abs() <= 1e-15 * std);
        assert!((s.cv.unwrap() - std / 3.0).abs() <= 1e-15);
        let one = ExpressionTable::new(names("S", 1), names("G", 1), vec![1.0], Scale::Log2Cpm);
        assert!(one.unwrap().gene_stats().is_err());
    }

    #[test]
    fn filter_reports_every_gene_once_with_its_reason() {
        #[rustfmt::skip]
        let values = vec![
            // const  low-mean  low-cv  kept   neg-mean
            0.1,      0.1,      10.0,   1.0,   -3.0,
            0.1,      0.3,      10.2,   5.0,   -1.0,
            0.1,      0.2,      9.8,    3.0,   -2.0,
        ];
        let t = ExpressionTable::new(names("S", 3), names("G", 5), values, Scale::Log2Cpm).unwrap();
        let filter = GeneFilter {
            min_mean: -10.0,
            min_cv: 0.1,
        };
        let report = t.filter_genes(&filter).unwrap();
        assert_eq!(report.kept, vec!["G1".to_string(), "G3".to_string()]);
        let reasons: Vec<(&str, DropReason)> = report
            .dropped
            .iter()
            .map(|d| (d.gene.as_str(), d.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("G0", DropReason::ZeroVariance),
                ("G2", DropReason::LowCv),
                ("G4", DropReason::UndefinedCv),
            ]
        );
        let strict = GeneFilter {
            min_mean: 1.0,
            min_cv: 0.1,
        };
        let report = t.filter_genes(&strict).unwrap();
        assert_eq!(report.kept, vec!["G3".to_string()]);
        assert_eq!(report.dropped[1].reason, DropReason::LowMean);
        assert_eq!(report.stats.len(), 5);
        let nan = GeneFilter {
            min_mean: f64::NAN,
            min_cv: 0.0,
        };
        assert!(t.filter_genes(&nan).is_err());
    }

    #[test]
    fn select_genes_reorders_and_validates() {
        let t = counts();
        let sub = t.select_genes(&["G3", "G0"]).unwrap();
        assert_eq!(sub.genes(), ["G3".to_string(), "G0".to_string()]);
        assert_eq!(sub.values(), [900.0, 10.0, 100.0, 20.0, 400.0, 30.0]);
        assert_eq!(sub.scale(), Scale::RawCounts);
        assert!(t.select_genes(&["nope"]).is_err());
        assert!(t.select_genes(&["G1", "G1"]).is_err());
        assert!(t.select_genes::<&str>(&[]).is_err());
        assert_eq!(t.gene_values(2), Some(vec![90.0, 80.0, 70.0]));
        assert_eq!(t.gene_values(4), None);
        assert_eq!(t.gene_index("G2"), Some(2));
    }
}
