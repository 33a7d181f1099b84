//! Statistics and evaluation metrics.
