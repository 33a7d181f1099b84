//! Batched linear epsilon-SVR and grid search.
