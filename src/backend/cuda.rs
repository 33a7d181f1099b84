//! The CUDA side of the launch layer, on cudarc's driver API.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::{kernels, LaunchCfg};
use crate::error::{Error, Result};

/// Above this, a kernel must opt in to more dynamic shared memory.
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

/// True when the CUDA driver library can be loaded. cudarc panics on the first
/// driver call when it cannot, so every entry point probes this first.
fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda; no driver call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

pub(crate) fn device_count() -> usize {
    if !kernels::cuda_compiled() || !driver_present() {
        return 0;
    }
    CudaContext::device_count()
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
}

/// A CUDA context with one stream and the modules loaded so far. All work is
/// queued on the one stream, so ordering between launches and copies is the
/// stream order.
pub(crate) struct CudaBackend {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl CudaBackend {
    pub(crate) fn new(ordinal: usize) -> Result<Self> {
        if !kernels::cuda_compiled() {
            return Err(Error::NoKernels);
        }
        if !driver_present() {
            return Err(Error::NoCudaDevice(
                "the CUDA driver (libcuda) is not installed on this machine".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoCudaDevice(e.to_string()))?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(Error::NoCudaDevice(format!(
                "cuda:{ordinal} requested but {count} CUDA device(s) are present"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::cuda(format!("opening cuda:{ordinal}"), e))?;
        // One stream orders everything, so cudarc's per-buffer events are not needed.
        // SAFETY: no buffers exist yet on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ordinal,
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = self
            .ctx
            .compute_capability()
            .map(|(a, b)| format!(", sm_{a}{b}"))
            .unwrap_or_default();
        format!("cuda:{} ({name}{cc})", self.ordinal)
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::cuda("synchronizing the stream (a kernel may have faulted)", e))
    }

    fn function(&self, kernel: &str) -> Result<CudaFunction> {
        let mut functions = self
            .functions
            .lock()
            .map_err(|_| Error::cuda("kernel cache", "poisoned lock"))?;
        if let Some(f) = functions.get(kernel) {
            return Ok(f.clone());
        }
        let module_name = kernels::module_of(kernel)
            .ok_or_else(|| Error::invalid(format!("no kernel named {kernel} in kernels/*.cu")))?;
        let module = {
            let mut modules = self
                .modules
                .lock()
                .map_err(|_| Error::cuda("module cache", "poisoned lock"))?;
            match modules.get(module_name) {
                Some(m) => m.clone(),
                None => {
                    let image = kernels::fatbin(module_name).ok_or_else(|| {
                        Error::cuda(
                            format!("loading kernels/{module_name}.cu"),
                            "its fatbin is missing from this build (nvcc failed on it)",
                        )
                    })?;
                    let m = self
                        .ctx
                        .load_module(Ptx::from_binary(image.to_vec()))
                        .map_err(|e| Error::cuda(format!("loading kernels/{module_name}.cu"), e))?;
                    modules.insert(module_name, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(kernel)
            .map_err(|e| Error::cuda(format!("loading kernel {kernel}"), e))?;
        functions.insert(kernel.to_string(), f.clone());
        Ok(f)
    }

    /// # Safety
    /// As [`super::Backend::launch`]: `params` points at argument values that
    /// match the kernel's parameters, and buffers outlive the launch.
    pub(crate) unsafe fn launch(
        &self,
        kernel: &str,
        cfg: LaunchCfg,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.function(kernel)?;
        if cfg.shared_bytes > DEFAULT_SHARED_LIMIT {
            let bytes = i32::try_from(cfg.shared_bytes).map_err(|_| {
                Error::invalid(format!(
                    "{kernel}: {} bytes of shared memory",
                    cfg.shared_bytes
                ))
            })?;
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes,
            )
            .map_err(|e| {
                Error::cuda(
                    format!("{kernel}: requesting {bytes} bytes of shared memory"),
                    e,
                )
            })?;
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("binding the context", e))?;
        // SAFETY: the function belongs to this context; the caller guarantees
        // the parameter array matches the kernel and its buffers stay alive.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                cfg.grid,
                cfg.block,
                cfg.shared_bytes,
                self.stream.cu_stream(),
                params,
            )
        }
        .map_err(|e| {
            Error::cuda(
                format!(
                    "launching {kernel} (grid {:?}, block {:?}, {} B shared)",
                    cfg.grid, cfg.block, cfg.shared_bytes
                ),
                e,
            )
        })
    }
}
