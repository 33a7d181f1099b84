//! Numeric CSV tables (samples × named columns).
