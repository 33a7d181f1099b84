//! The training core: losses ([`loss`]), optimizers and gradient clipping
//! ([`optim`]), and learning-rate schedules ([`Schedule`]), with PyTorch's
//! semantics ([reference](crate::reference) §4). Everything here is
//! deterministic: the same inputs give the same bits.

pub mod checkpoint;
pub mod cp2image;
pub mod densenet;
pub mod loss;
pub mod optim;
pub mod store;
pub mod vqvae2;

pub use optim::{AdamConfig, Method, Optimizer, ParamGroup, SgdConfig};
pub use store::{Param, ParamStore};

use crate::{Error, Result};

/// A learning-rate schedule: the rate of step `t` (0-based, the number of
/// optimizer steps taken before this one), as PyTorch's schedulers give it
/// when `scheduler.step()` is called once per optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// `base` at every step.
    Constant {
        /// The rate.
        base: f64,
    },
    /// `StepLR`: `base · gamma^⌊t / every⌋`.
    Step {
        /// The rate of the first `every` steps.
        base: f64,
        /// Steps between two decays (at least 1).
        every: u64,
        /// The factor of each decay.
        gamma: f64,
    },
    /// `CosineAnnealingLR` in closed form: `min + (base − min)·(1 +
    /// cos(π·t/total))/2` for `t ≤ total`, `min` after.
    Cosine {
        /// The rate at step 0.
        base: f64,
        /// The rate at step `total` and after.
        min: f64,
        /// Steps from `base` to `min` (at least 1).
        total: u64,
    },
}

impl Schedule {
    /// Checks the schedule's numbers: finite, non-negative rates, positive
    /// periods.
    pub fn validate(&self) -> Result<()> {
        let rates: &[f64] = match self {
            Schedule::Constant { base } => &[*base],
            Schedule::Step { base, gamma, .. } => &[*base, *gamma],
            Schedule::Cosine { base, min, .. } => &[*base, *min],
        };
        if rates.iter().any(|r| !r.is_finite() || *r < 0.0) {
            return Err(Error::invalid(format!(
                "learning-rate schedule {self:?}: rates and factors must be finite and non-negative"
            )));
        }
        match self {
            Schedule::Step { every: 0, .. } | Schedule::Cosine { total: 0, .. } => {
                Err(Error::invalid(format!(
                    "learning-rate schedule {self:?}: the period must be at least one step"
                )))
            }
            _ => Ok(()),
        }
    }

    /// The rate of step `t`.
    pub fn lr(&self, t: u64) -> f64 {
        match *self {
            Schedule::Constant { base } => base,
            Schedule::Step { base, every, gamma } => {
                let k = t / every.max(1);
                base * gamma.powi(k.min(i32::MAX as u64) as i32)
            }
            Schedule::Cosine { base, min, total } => {
                if t >= total {
                    min
                } else {
                    let f = t as f64 / total.max(1) as f64;
                    min + (base - min) * (1.0 + (std::f64::consts::PI * f).cos()) / 2.0
                }
            }
        }
    }
}

/// A schedule preceded by a linear warm-up: over the first `steps` steps
/// the rate rises as `inner.lr(t) · (t + 1) / (steps + 1)` (PyTorch's
/// `LinearLR(start_factor = 1/(steps+1))` chained with the inner schedule),
/// and from step `steps` on it is `inner.lr(t)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmUp {
    /// Warm-up steps (0: none).
    pub steps: u64,
    /// The schedule warmed up.
    pub inner: Schedule,
}

impl WarmUp {
    /// The rate of step `t`.
    pub fn lr(&self, t: u64) -> f64 {
        let base = self.inner.lr(t);
        if t < self.steps {
            base * (t + 1) as f64 / (self.steps + 1) as f64
        } else {
            base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_their_formulas() {
        let c = Schedule::Constant { base: 0.1 };
        assert_eq!(c.lr(0), 0.1);
        assert_eq!(c.lr(1000), 0.1);
        let s = Schedule::Step {
            base: 1.0,
            every: 3,
            gamma: 0.5,
        };
        let got: Vec<f64> = (0..7).map(|t| s.lr(t)).collect();
        assert_eq!(got, vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]);
        let cos = Schedule::Cosine {
            base: 1.0,
            min: 0.0,
            total: 4,
        };
        assert_eq!(cos.lr(0), 1.0);
        assert!((cos.lr(2) - 0.5).abs() < 1e-15);
        assert_eq!(cos.lr(4), 0.0);
        assert_eq!(cos.lr(9), 0.0);
        let w = WarmUp { steps: 3, inner: c };
        let got: Vec<f64> = (0..5).map(|t| w.lr(t)).collect();
        assert!((got[0] - 0.025).abs() < 1e-15 && (got[2] - 0.075).abs() < 1e-15);
        assert_eq!(got[3], 0.1);
        assert!(Schedule::Step {
            base: 1.0,
            every: 0,
            gamma: 0.5
        }
        .validate()
        .is_err());
        assert!(Schedule::Constant { base: f64::NAN }.validate().is_err());
        assert!(cos.validate().is_ok());
    }
}
