//! The emulated side of the launch layer: kernels compiled as host C++ by
//! build.rs and run by kernels/emulation/cuda_emu.cpp.

use std::ffi::{c_char, c_void, CStr};

use super::kernels::{self, EmuLaunchCfg};
use super::LaunchCfg;
use crate::error::{Error, Result};

/// # Safety
/// As [`super::Backend::launch`], with host addresses for buffers.
pub(super) unsafe fn launch(
    kernel: &str,
    cfg: LaunchCfg,
    params: &mut [*mut c_void],
) -> Result<()> {
    let entry = kernels::emulated(kernel).ok_or_else(|| Error::Emulation {
        kernel: kernel.to_string(),
        msg: "not present in the emulation build".into(),
    })?;
    let c = EmuLaunchCfg {
        grid: [cfg.grid.0, cfg.grid.1, cfg.grid.2],
        block: [cfg.block.0, cfg.block.1, cfg.block.2],
        shared_bytes: cfg.shared_bytes as usize,
    };
    let mut err = [0 as c_char; 512];
    // SAFETY: `entry` is the host-compiled kernel of that name; the caller
    // guarantees `params` matches its parameter list and that the host
    // buffers it points to are valid for the whole (synchronous) run.
    let rc = unsafe { entry(&c, params.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the runtime NUL-terminates the message within `err.len()`; the
    // last byte is forced to NUL in case it did not.
    let msg = unsafe {
        err[err.len() - 1] = 0;
        CStr::from_ptr(err.as_ptr())
    }
    .to_string_lossy()
    .into_owned();
    Err(Error::Emulation {
        kernel: kernel.to_string(),
        msg,
    })
}
