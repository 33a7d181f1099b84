//! Kernel-argument buffers for kernels that take `f64` and 64/32-bit integer
//! arrays (the SMO solvers of `svm::device` and `svr::device`), and how those
//! solvers pack problems into blocks of warps.
//!
//! [`Tensor`] has no `f64` element type, so `f64` buffers travel as their bit
//! patterns in `Tensor<i64>`. Every buffer is at least one element long so
//! that no launch gets a null pointer.

use super::Backend;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// An `f64` buffer on `be`'s device as bit patterns in an `i64` tensor.
pub(crate) fn f64_buffer(be: &Backend, data: &[f64]) -> Result<Tensor<i64>> {
    let bits: Vec<i64> = data.iter().map(|v| v.to_bits() as i64).collect();
    i64_buffer(be, &bits)
}

/// The values of an [`f64_buffer`].
pub(crate) fn read_f64(t: &Tensor<i64>) -> Result<Vec<f64>> {
    Ok(t.to_vec()?
        .into_iter()
        .map(|b| f64::from_bits(b as u64))
        .collect())
}

/// An `i64` buffer on `be`'s device.
pub(crate) fn i64_buffer(be: &Backend, data: &[i64]) -> Result<Tensor<i64>> {
    let mut v = data.to_vec();
    if v.is_empty() {
        v.push(0);
    }
    Tensor::from_vec(be, &[v.len()], v)
}

/// An `int` buffer on `be`'s device; an error naming `op` and `what` if a
/// value does not fit.
pub(crate) fn int_buffer(
    be: &Backend,
    op: &str,
    what: &str,
    data: &[usize],
) -> Result<Tensor<i32>> {
    let mut v = data
        .iter()
        .map(|&x| {
            i32::try_from(x).map_err(|_| {
                Error::invalid(format!(
                    "{op}: {what} {x} does not fit a 32-bit kernel argument"
                ))
            })
        })
        .collect::<Result<Vec<i32>>>()?;
    if v.is_empty() {
        v.push(0);
    }
    Tensor::from_vec(be, &[v.len()], v)
}

/// Problems packed into blocks of at most `per_block` warps (one problem a
/// warp), each block's problems consecutive and on one set (one shared Gram
/// matrix): block b solves problems `first[b] + w`, `w < count[b]`, on set
/// `set[b]`.
pub(crate) struct WarpBlocks {
    per_block: usize,
    /// The set of each block.
    pub set: Vec<usize>,
    /// The first problem of each block.
    pub first: Vec<usize>,
    /// The problems of each block.
    pub count: Vec<usize>,
}

impl WarpBlocks {
    /// No blocks yet; at most `per_block` problems a block.
    pub fn new(per_block: usize) -> WarpBlocks {
        WarpBlocks {
            per_block,
            set: Vec::new(),
            first: Vec::new(),
            count: Vec::new(),
        }
    }

    /// Adds problem `p` (the one after the last added) on set `s`: to the
    /// last block if that is on `s` and not full, else to a new block.
    pub fn push(&mut self, s: usize, p: usize) {
        let open =
            self.set.last() == Some(&s) && self.count.last().is_some_and(|&n| n < self.per_block);
        if open {
            if let Some(n) = self.count.last_mut() {
                *n += 1;
            }
        } else {
            self.set.push(s);
            self.first.push(p);
            self.count.push(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f64_round_trip_keeps_every_bit_and_empty_buffers_get_one_element() {
        let be = Backend::cpu();
        let values = [
            0.0,
            -0.0,
            1.5,
            f64::MIN_POSITIVE / 2.0,
            f64::NAN,
            -f64::INFINITY,
        ];
        let back = read_f64(&f64_buffer(&be, &values).unwrap()).unwrap();
        assert_eq!(back.len(), values.len());
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        assert_eq!(i64_buffer(&be, &[]).unwrap().to_vec().unwrap(), vec![0]);
        let err = int_buffer(&be, "svm device solver", "sample index", &[1, 1 << 40])
            .unwrap_err()
            .to_string();
        assert!(err.contains("svm device solver: sample index"), "{err}");
    }

    #[test]
    fn warp_blocks_start_a_block_at_each_new_set_and_when_full() {
        let mut b = WarpBlocks::new(2);
        for (p, s) in [0, 0, 0, 1, 0].into_iter().enumerate() {
            b.push(s, p);
        }
        assert_eq!(b.set, vec![0, 0, 1, 0]);
        assert_eq!(b.first, vec![0, 2, 3, 4]);
        assert_eq!(b.count, vec![2, 1, 1, 1]);
    }
}
