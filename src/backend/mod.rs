//! The launch layer: one [`Backend`] per device, owning what the device needs
//! (CUDA context, stream and loaded modules), and one way to launch a kernel
//! by name with a grid, a block, dynamic shared memory and an argument list —
//! the same call for a real GPU and for the emulated one.

pub(crate) mod buffers;
mod cuda;
mod emulated;
pub(crate) mod kernels;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::precision::Precision;

pub(crate) use cuda::CudaBackend;

/// Kernel launch geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block in bytes.
    pub shared_bytes: u32,
}

impl LaunchCfg {
    /// A 1-D launch with `threads` threads per block covering `n` items.
    pub fn linear(n: usize, threads: u32) -> Result<Self> {
        let blocks = n.div_ceil(threads as usize).max(1);
        let blocks = u32::try_from(blocks)
            .map_err(|_| Error::invalid(format!("{n} elements need more than 2^32 blocks")))?;
        Ok(LaunchCfg {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        })
    }
}

/// One kernel argument. Buffers are passed as raw addresses: device addresses
/// on CUDA, host addresses on the emulated device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A pointer to a buffer.
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `long long`.
    I64(i64),
    /// `unsigned long long` / `size_t`.
    U64(u64),
    /// `float`.
    F32(f32),
}

impl KernelArg {
    /// The argument's bytes in a 64-bit slot. The kernel reads the low
    /// `sizeof(T)` bytes at the slot's address, which on a little-endian host
    /// (x86-64, aarch64) are exactly the value's bytes.
    fn slot(self) -> u64 {
        match self {
            KernelArg::Ptr(p) | KernelArg::U64(p) => p,
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::U32(v) => v as u64,
            KernelArg::I64(v) => v as u64,
            KernelArg::F32(v) => v.to_bits() as u64,
        }
    }

    /// A size or index as a kernel `int`, or an error naming what overflowed.
    pub fn int(what: &str, v: usize) -> Result<Self> {
        i32::try_from(v).map(KernelArg::I32).map_err(|_| {
            Error::invalid(format!(
                "{what} = {v} does not fit a 32-bit kernel argument"
            ))
        })
    }
}

/// The argument slots and the `void*` array pointing into them, as
/// `cuLaunchKernel` and the emulated entry points both take.
struct ArgPack {
    slots: Vec<u64>,
}

impl ArgPack {
    fn new(args: &[KernelArg]) -> Self {
        ArgPack {
            slots: args.iter().map(|a| a.slot()).collect(),
        }
    }
    fn pointers(&mut self) -> Vec<*mut std::ffi::c_void> {
        self.slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut std::ffi::c_void)
            .collect()
    }
}

pub(crate) enum Inner {
    Cpu,
    Cuda(CudaBackend),
    Emulated,
}

/// A device ready to run ops: for CUDA it holds the context, the stream and
/// the loaded kernel modules. Create one per device and share it by reference.
pub struct Backend {
    device: Device,
    precision: Precision,
    pub(crate) inner: Inner,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({}, {})", self.device, self.precision)
    }
}

impl Backend {
    /// Opens `device`. For CUDA this fails with a clear error when the build
    /// carries no kernels, when no driver is installed or when the ordinal
    /// does not exist; it never panics.
    pub fn new(device: Device) -> Result<Self> {
        let inner = match device {
            Device::Cpu => Inner::Cpu,
            Device::Emulated => {
                if !emulation_compiled() {
                    return Err(Error::invalid(
                        "the emulated device is not available: the kernels did not compile as host C++ in this build (see the build warnings)",
                    ));
                }
                Inner::Emulated
            }
            Device::Cuda(ordinal) => Inner::Cuda(CudaBackend::new(ordinal)?),
        };
        Ok(Backend {
            device,
            precision: Precision::F32,
            inner,
        })
    }

    /// The CPU reference backend (cannot fail).
    pub fn cpu() -> Self {
        Backend {
            device: Device::Cpu,
            precision: Precision::F32,
            inner: Inner::Cpu,
        }
    }

    /// This backend with convolutions at `precision` (see [`Precision`]):
    /// bf16/f16 select the tensor-core convolution where it applies.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The precision of this backend's convolutions.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device this backend runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// A short description, e.g. the GPU's name.
    pub fn describe(&self) -> String {
        match &self.inner {
            Inner::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Inner::Cuda(c) => c.describe(),
            Inner::Emulated => "emulated CUDA on the CPU".to_string(),
        }
    }

    /// Waits until all queued work has finished and reports any asynchronous
    /// kernel error.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner {
            Inner::Cuda(c) => c.synchronize(),
            Inner::Cpu | Inner::Emulated => Ok(()),
        }
    }

    /// Launches `kernel` (an exported name in kernels/*.cu).
    ///
    /// # Safety
    /// Every `Ptr` argument must be an address on this backend's device that
    /// stays valid until the launch completes, with the extent the kernel
    /// indexes given the other arguments; the argument list must match the
    /// kernel's parameter list in count, order and type.
    pub(crate) unsafe fn launch(
        &self,
        kernel: &str,
        cfg: LaunchCfg,
        args: &[KernelArg],
    ) -> Result<()> {
        let mut pack = ArgPack::new(args);
        let mut ptrs = pack.pointers();
        match &self.inner {
            Inner::Cpu => Err(Error::invalid(format!(
                "kernel {kernel} cannot be launched on the CPU device (use the CPU reference)"
            ))),
            // SAFETY: forwarded from this function's contract.
            Inner::Cuda(c) => unsafe { c.launch(kernel, cfg, &mut ptrs) },
            // SAFETY: forwarded from this function's contract.
            Inner::Emulated => unsafe { emulated::launch(kernel, cfg, &mut ptrs) },
        }
    }
}

/// True when this build carries nvcc-compiled kernels.
pub fn cuda_compiled() -> bool {
    kernels::cuda_compiled()
}

/// True when this build carries the host-compiled (emulated) kernels.
pub fn emulation_compiled() -> bool {
    !kernels::EMU_KERNELS.is_empty()
}

/// Number of CUDA devices usable by this build, 0 when there is no driver,
/// no GPU or no compiled kernels.
pub fn cuda_device_count() -> usize {
    cuda::device_count()
}

#[cfg(test)]
mod tests {
    //! The launch layer itself, through kernels/selftest.cu on the emulated
    //! device (and CUDA when a GPU is present: `--include-ignored`).
    use super::*;
    use crate::tensor::Tensor;

    fn block_sums(be: &Backend) {
        let n = 1000usize;
        let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let x = Tensor::from_vec(be, &[n], x.clone()).unwrap();
        let mut out = Tensor::<f32>::zeros(be, &[4]).unwrap();
        let cfg = LaunchCfg {
            grid: (4, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        };
        // SAFETY: x holds n floats and out 4 = grid.x floats, as the kernel indexes.
        unsafe {
            be.launch(
                "selftest_block_sum_f32",
                cfg,
                &[x.arg(), out.arg_mut(), KernelArg::I32(n as i32)],
            )
        }
        .unwrap();
        let xs = x.to_vec().unwrap();
        let want: Vec<f32> = xs.chunks(256).map(|c| c.iter().sum()).collect();
        assert_eq!(out.to_vec().unwrap(), want);
    }

    fn dynamic_shared_reverse(be: &Backend) {
        let n = 300usize;
        let x = Tensor::from_vec(be, &[n], (0..n).map(|i| i as f32).collect()).unwrap();
        let mut y = Tensor::<f32>::zeros(be, &[n]).unwrap();
        let cfg = LaunchCfg {
            grid: (3, 1, 1),
            block: (128, 1, 1),
            shared_bytes: 128 * 4,
        };
        // SAFETY: x and y hold n floats; the kernel guards indices against n and
        // uses blockDim.x floats of dynamic shared memory.
        unsafe {
            be.launch(
                "selftest_reverse_dyn_f32",
                cfg,
                &[x.arg(), y.arg_mut(), KernelArg::I32(n as i32)],
            )
        }
        .unwrap();
        let want: Vec<f32> = (0..n)
            .map(|i| {
                let start = i / 128 * 128;
                let count = 128.min(n - start);
                (start + count - 1 - (i - start)) as f32
            })
            .collect();
        assert_eq!(y.to_vec().unwrap(), want);
    }

    #[test]
    fn emulated_launches_run_kernels() {
        let be = Backend::new(Device::Emulated).unwrap();
        block_sums(&be);
        dynamic_shared_reverse(&be);
    }

    #[test]
    fn emulated_divergent_barrier_is_an_error_not_a_hang() {
        let be = Backend::new(Device::Emulated).unwrap();
        let mut out = Tensor::<i32>::zeros(&be, &[64]).unwrap();
        let cfg = LaunchCfg {
            grid: (1, 1, 1),
            block: (64, 1, 1),
            shared_bytes: 0,
        };
        // SAFETY: out holds blockDim.x ints. Mode 1 is a deliberate divergent
        // barrier: only for emulation, which reports it.
        let err = unsafe {
            be.launch(
                "selftest_divergent_barrier",
                cfg,
                &[KernelArg::I32(1), out.arg_mut()],
            )
        }
        .unwrap_err();
        assert!(matches!(err, Error::Emulation { .. }), "{err}");
    }

    #[test]
    fn bad_launches_are_errors() {
        let be = Backend::new(Device::Emulated).unwrap();
        let cfg = LaunchCfg {
            grid: (1, 1, 1),
            block: (2048, 1, 1),
            shared_bytes: 0,
        };
        // SAFETY: rejected before any thread runs.
        let err = unsafe {
            be.launch(
                "selftest_saxpy_f32",
                cfg,
                &[
                    KernelArg::I32(0),
                    KernelArg::F32(1.0),
                    KernelArg::Ptr(0),
                    KernelArg::Ptr(0),
                ],
            )
        };
        assert!(err.is_err());
        // SAFETY: an unknown kernel is rejected by name.
        let err = unsafe { be.launch("no_such_kernel", cfg, &[]) }.unwrap_err();
        assert!(err.to_string().contains("no_such_kernel"), "{err}");
        // SAFETY: the CPU device refuses kernels.
        assert!(unsafe { Backend::cpu().launch("selftest_saxpy_f32", cfg, &[]) }.is_err());
    }

    #[test]
    fn cuda_without_a_gpu_is_a_clear_error() {
        if cuda_device_count() > 0 {
            println!("a CUDA device is present: see cuda_launches_run_kernels");
            return;
        }
        let err = Backend::new(Device::Cuda(0)).unwrap_err().to_string();
        assert!(
            err.contains("no CUDA device") || err.contains("CUDA kernels were not compiled"),
            "{err}"
        );
    }

    #[test]
    #[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
    fn cuda_launches_run_kernels() {
        assert!(
            cuda_device_count() > 0,
            "skipped: no CUDA device (this test needs a GPU)"
        );
        let be = Backend::new(Device::Cuda(0)).unwrap();
        block_sums(&be);
        dynamic_shared_reverse(&be);
    }
}
