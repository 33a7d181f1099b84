//! Convolution precision: f32 (the reference) or the tensor-core paths that
//! round both operands to bf16 or f16 and accumulate in f32.
//!
//! A [`crate::Backend`] carries one precision, like an autocast region:
//! with bf16 or f16, every convolution the tensor-core kernel covers (see
//! [`crate::ops::conv2d_uses_tensor_cores`]) rounds its input activations
//! and weights to the half type as it reads them, multiplies on tensor cores
//! and accumulates, adds the bias and applies the epilogue in f32. Tensors
//! stay f32 in memory, so a model's other layers are unchanged. On the CPU
//! the same layers round the same operands and then run the f32 reference,
//! which is what the kernels compute up to the order of the f32 additions.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

use crate::error::Error;

/// The precision of the convolutions' multiplications.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 throughout (the reference path).
    #[default]
    F32,
    /// Operands rounded to bfloat16 (8-bit mantissa, f32 range), f32 accumulation.
    Bf16,
    /// Operands rounded to IEEE half (11-bit mantissa, range ±65504), f32 accumulation.
    F16,
}

impl Precision {
    /// The name used on the command line and in kernel names.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// Whether this precision runs the tensor-core convolution.
    pub fn is_reduced(self) -> bool {
        self != Precision::F32
    }

    /// `v` rounded to this precision (round to nearest even) and widened
    /// back to f32: what a tensor-core kernel multiplies. NaN stays NaN;
    /// f16 overflows to ±∞.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Precision::F32 => v,
            Precision::Bf16 => bf16::from_f32(v).to_f32(),
            Precision::F16 => f16::from_f32(v).to_f32(),
        }
    }

    /// Rounds every value of `v` in place (see [`Precision::round`]).
    pub fn round_slice(self, v: &mut [f32]) {
        if self.is_reduced() {
            v.iter_mut().for_each(|x| *x = self.round(*x));
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;

    /// Parses `f32`, `bf16` or `f16` (also `fp32`, `bfloat16`, `fp16`, `half`).
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            _ => Err(Error::invalid(format!(
                "unknown precision {s:?} (expected f32, bf16 or f16)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
        let e = "f8".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("f8") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between two bf16 values: ties go to the even (1.0).
        assert_eq!(Precision::Bf16.round(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-9 rounds up to 1 + 2^-7.
        assert_eq!(Precision::Bf16.round(1.0 + 3.0 / 512.0), 1.0 + 1.0 / 128.0);
        assert_eq!(Precision::F16.round(1.0 + 1.0 / 4096.0), 1.0);
        assert_eq!(Precision::F16.round(70000.0), f32::INFINITY);
        assert!(Precision::Bf16.round(f32::NAN).is_nan());
        assert_eq!(Precision::F32.round(0.1), 0.1);
    }
}
