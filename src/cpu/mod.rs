//! CPU reference implementations of every op, over plain slices.
