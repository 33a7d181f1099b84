//! The launch layer: one [`Backend`] per device, owning what the device needs
//! (CUDA context, stream and loaded modules), and one way to launch a kernel
//! by name with a grid, a block, dynamic shared memory and an argument list —
//! the same call for a real GPU and for the emulated one.

mod cuda;
mod emulated;
pub(crate) mod kernels;

use crate::device::Device;
use crate::error::{Error, Result};

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
    pub(crate) inner: Inner,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({})", self.device)
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
        Ok(Backend { device, inner })
    }

    /// The CPU reference backend (cannot fail).
    pub fn cpu() -> Self {
        Backend {
            device: Device::Cpu,
            inner: Inner::Cpu,
        }
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
