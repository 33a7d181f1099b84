//! The per-gene linear SVR grid search from Rust: a profile table (samples ×
//! features) and an expression table (samples × genes), one epsilon-SVR per
//! gene fitted over a (C, ε) grid with 3-fold cross-validated R², as
//! scikit-learn's `GridSearchCV(SVR(kernel="linear"), cv=KFold(3))` does.
//!
//! ```sh
//! cargo run --release --example svr_grid -- [FEATURES.csv EXPRESSION.csv]
//! ```
//! Without arguments it uses the 29-sample test tables in
//! `tests/fixtures/svr` (3 of their 6 genes carry signal).

use std::path::PathBuf;

use cellmorph::svr::grid::{grid_search, GridSpec};
use cellmorph::table::Table;

fn main() -> cellmorph::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/svr");
    let mut args = std::env::args().skip(1);
    let features = args
        .next()
        .map_or_else(|| dir.join("grid_features.csv"), PathBuf::from);
    let expression = args
        .next()
        .map_or_else(|| dir.join("grid_expression.csv"), PathBuf::from);

    let x = Table::read_csv(&features)?;
    let y = Table::read_csv(&expression)?;
    // C in 0.01..100 on a log scale, ε 0..0.5: 45 settings × 3 folds per gene.
    let c: Vec<f64> = (-4..=4).map(|e| 10f64.powf(f64::from(e) / 2.0)).collect();
    let epsilon = vec![0.0, 0.05, 0.1, 0.25, 0.5];
    let spec = GridSpec::new(c, epsilon)?;
    let outcome = grid_search(&x, &y, &spec)?;

    println!("gene           C        ε     CV R²");
    for r in &outcome.results {
        println!(
            "{:<12} {:>7.3} {:>6.2} {:>9.3}",
            r.gene, r.c, r.epsilon, r.cv_score
        );
    }
    for s in &outcome.skipped {
        println!("skipped {}: {}", s.gene, s.reason);
    }
    println!(
        "{} problems, {} SMO solves",
        outcome.stats.problems, outcome.stats.smo_solves
    );
    Ok(())
}
