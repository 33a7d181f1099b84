//! A multi-class confusion matrix (rows: true class, columns: predicted)
//! with accuracy and per-class precision and recall, as CSV and as a PNG
//! heat map.

use std::path::Path;

use crate::csv::CsvWriter;
use crate::plot::{matrix_heatmap, MatrixHeatmapOptions};
use crate::{Error, Result};

/// Counts of (true, predicted) class pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confusion {
    /// Class names, in row and column order.
    pub classes: Vec<String>,
    /// `counts[t * classes.len() + p]`: samples of class t predicted p.
    pub counts: Vec<usize>,
}

impl Confusion {
    /// Counts the pairs of `truth` and `predicted` (class indices below
    /// `classes.len()`).
    ///
    /// # Errors
    /// Different lengths or an index out of range.
    pub fn new(classes: Vec<String>, truth: &[usize], predicted: &[usize]) -> Result<Confusion> {
        let k = classes.len();
        if truth.len() != predicted.len() {
            return Err(Error::shape(
                "Confusion::new",
                format!(
                    "{} true and {} predicted labels",
                    truth.len(),
                    predicted.len()
                ),
            ));
        }
        let mut counts = vec![0; k * k];
        for (&t, &p) in truth.iter().zip(predicted) {
            if t >= k || p >= k {
                return Err(Error::invalid(format!(
                    "confusion matrix: class index {} of {k} classes",
                    t.max(p)
                )));
            }
            counts[t * k + p] += 1;
        }
        Ok(Confusion { classes, counts })
    }

    fn k(&self) -> usize {
        self.classes.len()
    }

    /// Samples counted.
    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Fraction predicted correctly (NaN when empty).
    pub fn accuracy(&self) -> f64 {
        let k = self.k();
        let correct: usize = (0..k).map(|c| self.counts[c * k + c]).sum();
        correct as f64 / self.total() as f64
    }

    /// Of the samples predicted `c`, the fraction truly `c` (NaN when none
    /// is predicted `c`).
    pub fn precision(&self, c: usize) -> f64 {
        let k = self.k();
        let predicted: usize = (0..k).map(|t| self.counts[t * k + c]).sum();
        self.counts[c * k + c] as f64 / predicted as f64
    }

    /// Of the samples truly `c`, the fraction predicted `c` (NaN when there
    /// are none).
    pub fn recall(&self, c: usize) -> f64 {
        let k = self.k();
        let actual: usize = self.counts[c * k..(c + 1) * k].iter().sum();
        self.counts[c * k + c] as f64 / actual as f64
    }

    /// The matrix as CSV: header `true\predicted,<classes…>,recall`, one row
    /// per true class, then a `precision` row; a comment line first
    /// (`what`, the sample count and the accuracy).
    pub fn to_csv(&self, what: &str) -> CsvWriter {
        let k = self.k();
        let mut w = CsvWriter::new();
        w.comment(&format!(
            "{what}: {} samples, accuracy {:.4}",
            self.total(),
            self.accuracy()
        ));
        let mut header = vec!["true\\predicted".to_string()];
        header.extend(self.classes.iter().cloned());
        header.push("recall".into());
        w.record(&header);
        for t in 0..k {
            let mut r = vec![self.classes[t].clone()];
            r.extend(self.counts[t * k..(t + 1) * k].iter().map(usize::to_string));
            r.push(format!("{}", self.recall(t)));
            w.record(&r);
        }
        let mut r = vec!["precision".to_string()];
        r.extend((0..k).map(|c| format!("{}", self.precision(c))));
        r.push(String::new());
        w.record(&r);
        w
    }

    /// Writes the heat map (counts in the cells, colour = fraction of the
    /// true class's samples) as PNG.
    pub fn plot(&self, path: impl AsRef<Path>, title: &str) -> Result<()> {
        let k = self.k();
        let values: Vec<f64> = (0..k * k)
            .map(|i| {
                let row: usize = self.counts[(i / k) * k..(i / k + 1) * k].iter().sum();
                if row == 0 {
                    0.0
                } else {
                    self.counts[i] as f64 / row as f64
                }
            })
            .collect();
        let cells: Vec<String> = self.counts.iter().map(usize::to_string).collect();
        matrix_heatmap(
            path,
            &values,
            &cells,
            &self.classes,
            &self.classes,
            &MatrixHeatmapOptions {
                title: title.to_string(),
                x_label: "predicted".into(),
                y_label: "true".into(),
                range: Some((0.0, 1.0)),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_rates() {
        let c = Confusion::new(
            vec!["a".into(), "b".into()],
            &[0, 0, 0, 1, 1],
            &[0, 0, 1, 1, 0],
        )
        .unwrap();
        assert_eq!(c.counts, vec![2, 1, 1, 1]);
        assert_eq!(c.accuracy(), 0.6);
        assert_eq!(c.recall(0), 2.0 / 3.0);
        assert_eq!(c.precision(0), 2.0 / 3.0);
        assert_eq!(c.recall(1), 0.5);
        let text = c.to_csv("test").into_string();
        assert!(text.contains("a,2,1,0.6666666666666666\n"), "{text}");
        assert!(Confusion::new(vec!["a".into()], &[0], &[1]).is_err());
    }
}
