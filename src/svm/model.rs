//! A fitted RBF SVC as JSON, and prediction on a feature table.
//!
//! Format: `{"features": [names], "classes": [labels], "C", "gamma",
//! "gamma_setting": "scale" or the number, "support": [sample names],
//! "n_support": [per class], "support_vectors": [[values]], "dual_coef":
//! [[per support vector]] (classes − 1 rows), "intercept": [per pair],
//! "grid": {"folds", "scores": [{"C", "gamma", "fold_accuracy",
//! "mean_accuracy"}], "best"}}`. The arrays are scikit-learn's
//! `support_vectors_`, `n_support_`, `dual_coef_` and `intercept_` of a
//! multi-class `SVC` (libsvm's layout, see [`super::Svc`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Svc;
use crate::table::Table;
use crate::{Error, Result};

/// One grid setting's scores as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredScore {
    /// C.
    #[serde(rename = "C")]
    pub c: f64,
    /// gamma as given (`scale` or a number).
    pub gamma: String,
    /// Held-out accuracy per fold.
    pub fold_accuracy: Vec<f64>,
    /// Mean held-out accuracy.
    pub mean_accuracy: f64,
}

/// How the model's setting was chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredGrid {
    /// The cross-validation scheme, in words.
    pub folds: String,
    /// Every setting, in grid order.
    pub scores: Vec<StoredScore>,
    /// Index of the chosen setting.
    pub best: usize,
}

/// A fitted multi-class RBF SVC over named features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvmModel {
    /// Feature (column) names, in the order of the support vectors.
    pub features: Vec<String>,
    /// Class labels, sorted.
    pub classes: Vec<String>,
    /// C.
    #[serde(rename = "C")]
    pub c: f64,
    /// γ of the kernel (resolved when the setting was `scale`).
    pub gamma: f64,
    /// gamma as given: `scale` or the number.
    pub gamma_setting: String,
    /// Training samples that are support vectors, grouped by class.
    pub support: Vec<String>,
    /// Support vectors per class.
    pub n_support: Vec<usize>,
    /// The support vectors' feature rows.
    pub support_vectors: Vec<Vec<f64>>,
    /// Dual coefficients, `classes − 1` rows of one per support vector.
    pub dual_coef: Vec<Vec<f64>>,
    /// Intercept per class pair (0,1), (0,2), …, (1,2), ….
    pub intercept: Vec<f64>,
    /// The grid search that chose C and gamma, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<StoredGrid>,
}

impl SvmModel {
    /// The model of `svc` fitted on `samples` (names of the training rows
    /// given to [`Svc::fit`]) with class names `classes` (indexed by
    /// [`Svc::classes`]).
    pub fn from_svc(
        svc: &Svc,
        features: Vec<String>,
        classes: &[String],
        samples: &[String],
        c: f64,
        gamma_setting: String,
    ) -> SvmModel {
        SvmModel {
            features,
            classes: svc.classes.iter().map(|&k| classes[k].clone()).collect(),
            c,
            gamma: svc.gamma,
            gamma_setting,
            support: svc.support.iter().map(|&p| samples[p].clone()).collect(),
            n_support: svc.n_support.clone(),
            support_vectors: svc
                .support_vectors
                .chunks_exact(svc.n_features)
                .map(<[f64]>::to_vec)
                .collect(),
            dual_coef: svc.dual_coef.clone(),
            intercept: svc.intercept.clone(),
            grid: None,
        }
    }

    /// The model as an [`Svc`] (classes numbered 0..).
    pub fn svc(&self) -> Svc {
        Svc {
            classes: (0..self.classes.len()).collect(),
            n_support: self.n_support.clone(),
            support: (0..self.support.len()).collect(),
            support_vectors: self.support_vectors.concat(),
            n_features: self.features.len(),
            dual_coef: self.dual_coef.clone(),
            intercept: self.intercept.clone(),
            gamma: self.gamma,
            iterations: 0,
            unconverged: 0,
        }
    }

    /// Checks that the arrays fit together and every number is finite.
    pub fn validate(&self) -> Result<()> {
        let k = self.classes.len();
        let n_sv = self.support.len();
        let bad = |msg: String| Err(Error::invalid(format!("SVM model: {msg}")));
        if k < 2 {
            return bad(format!("{k} classes; at least 2 are needed"));
        }
        if self.features.is_empty() {
            return bad("no features".into());
        }
        if self.n_support.len() != k || self.n_support.iter().sum::<usize>() != n_sv {
            return bad(format!(
                "n_support {:?} does not split {n_sv} support vectors over {k} classes",
                self.n_support
            ));
        }
        if self.support_vectors.len() != n_sv
            || self
                .support_vectors
                .iter()
                .any(|v| v.len() != self.features.len())
        {
            return bad(format!(
                "support_vectors must be {n_sv} rows of {} values",
                self.features.len()
            ));
        }
        if self.dual_coef.len() != k - 1 || self.dual_coef.iter().any(|r| r.len() != n_sv) {
            return bad(format!("dual_coef must be {} rows of {n_sv} values", k - 1));
        }
        if self.intercept.len() != k * (k - 1) / 2 {
            return bad(format!(
                "{} intercepts for {} class pairs",
                self.intercept.len(),
                k * (k - 1) / 2
            ));
        }
        let all = self
            .support_vectors
            .iter()
            .chain(&self.dual_coef)
            .flatten()
            .chain(&self.intercept)
            .chain([&self.c, &self.gamma]);
        if all.clone().any(|v| !v.is_finite()) || self.gamma <= 0.0 || self.c <= 0.0 {
            return bad("non-finite values, or C or gamma not > 0".into());
        }
        Ok(())
    }

    /// Writes the model as pretty-printed JSON.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.validate()?;
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::format(path, format!("cannot encode SVM model: {e}")))?;
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// Reads and validates a model written by [`SvmModel::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<SvmModel> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let model: SvmModel = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not an SVM model: {e}")))?;
        model
            .validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(model)
    }

    /// The predicted class (an index into [`SvmModel::classes`]) and the
    /// one-vs-one decision values of every row of `features`, whose
    /// columns must include the model's features (found by name).
    pub fn predict(&self, features: &Table) -> Result<Vec<(usize, Vec<f64>)>> {
        let cols: Vec<usize> = self
            .features
            .iter()
            .map(|f| {
                features.col_index(f).ok_or_else(|| {
                    Error::invalid(format!(
                        "the feature table has no column '{f}', a feature of the model"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let svc = self.svc();
        Ok((0..features.n_rows())
            .map(|r| {
                let row = features.row(r);
                let x: Vec<f64> = cols.iter().map(|&c| row[c]).collect();
                let (dec, best) = svc.decide(&svc.kernel_values(&x));
                (best, dec)
            })
            .collect())
    }
}
