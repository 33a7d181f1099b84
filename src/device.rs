//! Where ops run: the CPU reference, a CUDA GPU, or the CUDA kernels emulated
//! on the CPU.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A compute device, chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The plain CPU reference implementation (rayon-parallel).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
    /// The CUDA kernels compiled as host C++ and run with one fiber per CUDA
    /// thread. For tests and debugging of kernel logic, not for speed.
    Emulated,
}

impl Device {
    /// True for the devices that run the kernels of `kernels/`.
    pub fn runs_kernels(self) -> bool {
        !matches!(self, Device::Cpu)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Emulated => write!(f, "emulated"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    /// Parses `cpu`, `cuda` (ordinal 0), `cuda:N` or `emulated`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "emulated" | "emu" => Ok(Device::Emulated),
            _ => {
                if let Some(n) = t.strip_prefix("cuda:") {
                    n.parse().map(Device::Cuda).map_err(|_| {
                        Error::invalid(format!(
                            "device {s:?}: the CUDA ordinal {n:?} is not a number"
                        ))
                    })
                } else {
                    Err(Error::invalid(format!(
                        "unknown device {s:?} (expected cpu, cuda, cuda:N or emulated)"
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
            ("emulated", Device::Emulated),
        ] {
            assert_eq!(s.parse::<Device>().unwrap(), d);
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("tpu".parse::<Device>().is_err());
    }
}
