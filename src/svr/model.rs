//! Fitted per-gene SVR models as JSON, and prediction on a feature table.
//!
//! Format: `{"features": [names], "genes": {gene: {"C", "epsilon",
//! "cv_score", "w", "b"}}, "training": {"samples": {name: fingerprint},
//! "warnings": [text]}}`; genes keep their order in the file. `training`
//! (optional; absent in older models) records which samples the model was
//! fitted on, each with a fingerprint of its feature row, so an evaluation
//! can tell in-sample from held-out data, and the grid search's warnings.

use std::fmt;
use std::path::Path;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::grid::GridResult;
use crate::table::Table;
use crate::{Error, Result};

/// One gene's fitted model and how it was chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneModel {
    /// Chosen C.
    #[serde(rename = "C")]
    pub c: f64,
    /// Chosen ε.
    pub epsilon: f64,
    /// Mean cross-validated R² of the chosen setting.
    pub cv_score: f64,
    /// Weights, one per feature.
    pub w: Vec<f64>,
    /// Intercept.
    pub b: f64,
}

/// What a model was fitted on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Training {
    /// Training samples in order, each with [`row_fingerprint`] of its
    /// feature row (in the model's feature order).
    #[serde(with = "ordered_map")]
    pub samples: Vec<(String, String)>,
    /// Warnings of the search that chose C and ε (e.g. a choice on the
    /// grid's edge).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// A fingerprint of one feature row: FNV-1a (64 bits, hex) over the
/// values' bit patterns, so only an identical row matches.
pub fn row_fingerprint(row: &[f64]) -> String {
    let text: Vec<String> = row
        .iter()
        .map(|v| format!("{:016x}", v.to_bits()))
        .collect();
    format!("{:016x}", crate::rng::fnv1a64(&text.join(",")))
}

/// Per-gene linear SVR models over one list of named features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvrModel {
    /// Feature (column) names, in the order of every `w`.
    pub features: Vec<String>,
    /// Models by gene, in order.
    #[serde(with = "ordered_map")]
    pub genes: Vec<(String, GeneModel)>,
    /// The training samples and the search's warnings, when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Training>,
    /// The per-batch correction the features were given before fitting
    /// (`center`, `standardize`), when any: features to predict from need
    /// the same correction, within their own batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_correction: Option<String>,
}

impl SvrModel {
    /// Collects grid-search results into a model.
    pub fn from_grid(features: Vec<String>, results: &[GridResult]) -> SvrModel {
        let genes = results
            .iter()
            .map(|r| {
                let model = GeneModel {
                    c: r.c,
                    epsilon: r.epsilon,
                    cv_score: r.cv_score,
                    w: r.w.clone(),
                    b: r.b,
                };
                (r.gene.clone(), model)
            })
            .collect();
        SvrModel {
            features,
            genes,
            training: None,
            batch_correction: None,
        }
    }

    /// Records the training samples (the rows of `features`, any column
    /// order with the model's feature columns) and the search's warnings.
    pub fn with_training(mut self, features: &Table, warnings: Vec<String>) -> Result<SvrModel> {
        let x = features.select_cols(&self.features)?;
        let samples = (0..x.n_rows())
            .map(|r| (x.row_names[r].clone(), row_fingerprint(x.row(r))))
            .collect();
        self.training = Some(Training { samples, warnings });
        Ok(self)
    }

    /// How many rows of `features` are training samples (same name and
    /// identical feature row); `None` when the model records no training
    /// samples.
    pub fn training_rows_in(&self, features: &Table) -> Result<Option<usize>> {
        let Some(t) = &self.training else {
            return Ok(None);
        };
        let known: std::collections::HashMap<&str, &str> = t
            .samples
            .iter()
            .map(|(s, f)| (s.as_str(), f.as_str()))
            .collect();
        let x = features.select_cols(&self.features)?;
        Ok(Some(
            (0..x.n_rows())
                .filter(|&r| {
                    known.get(x.row_names[r].as_str()) == Some(&row_fingerprint(x.row(r)).as_str())
                })
                .count(),
        ))
    }

    /// Checks unique names, `w` lengths and finite numbers.
    pub fn validate(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        if let Some(f) = self.features.iter().find(|f| !seen.insert(f.as_str())) {
            return Err(Error::invalid(format!(
                "SVR model: duplicate feature '{f}'"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for (gene, m) in &self.genes {
            if !seen.insert(gene.as_str()) {
                return Err(Error::invalid(format!(
                    "SVR model: duplicate gene '{gene}'"
                )));
            }
            if m.w.len() != self.features.len() {
                return Err(Error::invalid(format!(
                    "SVR model: gene '{gene}' has {} weights for {} features",
                    m.w.len(),
                    self.features.len()
                )));
            }
            let finite = [m.c, m.epsilon, m.cv_score, m.b]
                .iter()
                .chain(&m.w)
                .all(|v| v.is_finite());
            if !finite {
                return Err(Error::invalid(format!(
                    "SVR model: gene '{gene}' has a non-finite value"
                )));
            }
        }
        Ok(())
    }

    /// Writes the model as pretty-printed JSON.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.validate()?;
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::format(path, format!("cannot encode SVR model: {e}")))?;
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// Reads and validates a model written by [`SvrModel::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<SvrModel> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let model: SvrModel = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not an SVR model: {e}")))?;
        model
            .validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(model)
    }

    /// Predicted expression (samples × genes) for the rows of `features`,
    /// whose columns must be exactly the model's features (any order).
    /// Refuses a model fitted on batch-corrected features, whose inputs must
    /// be corrected first ([`SvrModel::predict_corrected`]).
    pub fn predict(&self, features: &Table) -> Result<Table> {
        if let Some(mode) = &self.batch_correction {
            return Err(Error::invalid(format!(
                "this SVR model was fitted on batch-corrected features ({mode}); \
                 predict with `cellmorph svr predict --batches FILE` so the features \
                 are corrected the same way"
            )));
        }
        self.predict_corrected(features)
    }

    /// [`SvrModel::predict`] on features already corrected as
    /// `batch_correction` says (or uncorrected when it is `None`).
    pub fn predict_corrected(&self, features: &Table) -> Result<Table> {
        if features.n_cols() != self.features.len() {
            return Err(Error::invalid(format!(
                "SVR model expects {} features, the table has {}",
                self.features.len(),
                features.n_cols()
            )));
        }
        let reordered;
        let x = if features.col_names == self.features {
            features
        } else {
            if let Some(f) = self
                .features
                .iter()
                .find(|f| features.col_index(f).is_none())
            {
                return Err(Error::invalid(format!(
                    "SVR model feature '{f}' is not a column of the feature table"
                )));
            }
            reordered = features.select_cols(&self.features)?;
            &reordered
        };
        let mut data = Vec::with_capacity(x.n_rows() * self.genes.len());
        for r in 0..x.n_rows() {
            let row = x.row(r);
            data.extend(
                self.genes
                    .iter()
                    .map(|(_, m)| m.w.iter().zip(row).map(|(w, v)| w * v).sum::<f64>() + m.b),
            );
        }
        let genes = self.genes.iter().map(|(g, _)| g.clone()).collect();
        Table::new(x.row_names.clone(), genes, data)
    }
}

/// A `Vec<(String, V)>` as a JSON object, keeping its order.
mod ordered_map {
    use super::*;

    pub fn serialize<S: Serializer, V: Serialize>(
        entries: &[(String, V)],
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(entries.len()))?;
        for (k, v) in entries {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>, V: Deserialize<'de>>(
        deserializer: D,
    ) -> std::result::Result<Vec<(String, V)>, D::Error> {
        struct Ordered<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Ordered<V> {
            type Value = Vec<(String, V)>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_map(Ordered(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> SvrModel {
        let gene = |w: Vec<f64>, b| GeneModel {
            c: 1.0,
            epsilon: 0.1,
            cv_score: 0.5,
            w,
            b,
        };
        SvrModel {
            features: vec!["f1".into(), "f2".into()],
            genes: vec![
                ("Z".into(), gene(vec![1.0, 2.0], 0.5)),
                ("A".into(), gene(vec![-1.0, 0.0], 0.0)),
            ],
            training: None,
            batch_correction: None,
        }
    }

    #[test]
    fn training_samples_round_trip_and_match_by_row() {
        let t = Table::new(
            vec!["a".into(), "b".into()],
            vec!["f2".into(), "f1".into()],
            vec![1.0, 2.0, 3.0, 4.0],
        )
        .unwrap();
        let m = model().with_training(&t, vec!["edge".into()]).unwrap();
        let text = serde_json::to_string(&m).unwrap();
        let back: SvrModel = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.training_rows_in(&t).unwrap(), Some(2));
        // Same names, one row changed: only the other is a training row.
        let mut other = t.clone();
        other.data[0] = 1.5;
        assert_eq!(back.training_rows_in(&other).unwrap(), Some(1));
        // Older models without the record: unknown.
        let old: SvrModel =
            serde_json::from_str(&serde_json::to_string(&model()).unwrap()).unwrap();
        assert!(!serde_json::to_string(&old).unwrap().contains("training"));
        assert_eq!(old.training_rows_in(&t).unwrap(), None);
    }

    #[test]
    fn json_round_trip_keeps_gene_order() {
        let m = model();
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"C\":1.0"), "{text}");
        assert!(text.find("\"Z\"").unwrap() < text.find("\"A\"").unwrap());
        let back: SvrModel = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn predicts_with_feature_checks() {
        let m = model();
        let t = Table::new(
            vec!["s".into()],
            vec!["f2".into(), "f1".into()],
            vec![3.0, 1.0],
        )
        .unwrap();
        let p = m.predict(&t).unwrap();
        assert_eq!(p.col_names, ["Z", "A"]);
        // Z: 1·1 + 2·3 + 0.5; A: −1·1.
        assert_eq!(p.data, [7.5, -1.0]);
        let t = Table::new(
            vec!["s".into()],
            vec!["f1".into(), "x".into()],
            vec![3.0, 1.0],
        )
        .unwrap();
        let e = m.predict(&t).unwrap_err().to_string();
        assert!(e.contains("'f2'"), "{e}");
        let t = Table::new(vec!["s".into()], vec!["f1".into()], vec![3.0]).unwrap();
        let e = m.predict(&t).unwrap_err().to_string();
        assert!(e.contains("expects 2 features"), "{e}");
    }

    #[test]
    fn validate_rejects_bad_models() {
        let mut m = model();
        m.genes[0].1.w.pop();
        assert!(m.validate().is_err());
        let mut m = model();
        m.genes[1].0 = "Z".into();
        assert!(m.validate().is_err());
        let mut m = model();
        m.genes[0].1.b = f64::NAN;
        assert!(m.validate().is_err());
    }
}
