//! Tensors: a shape and a buffer on a device. Host memory for the CPU and the
//! emulated device, device memory for CUDA. Row-major (NCHW for images).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use crate::backend::{Backend, Inner, KernelArg};
use crate::device::Device;
use crate::error::{Error, Result};

/// An element type a tensor can hold.
pub trait Element:
    bytemuck::Pod + DeviceRepr + ValidAsZeroBits + Default + std::fmt::Debug + Send + Sync + 'static
{
    /// The safetensors dtype of this element.
    const DTYPE: safetensors::Dtype;
}

impl Element for f32 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::F32;
}
impl Element for f64 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::F64;
}
impl Element for i32 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::I32;
}
impl Element for u32 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::U32;
}
impl Element for i64 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::I64;
}
impl Element for half::f16 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::F16;
}
impl Element for half::bf16 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::BF16;
}

enum Storage<T: Element> {
    /// Host memory: the CPU device or the emulated one.
    Host(Vec<T>),
    Cuda(CudaSlice<T>),
}

/// An n-dimensional array on a device.
pub struct Tensor<T: Element = f32> {
    shape: Vec<usize>,
    device: Device,
    storage: Storage<T>,
}

impl<T: Element> std::fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor<{:?}>({:?} on {})",
            T::DTYPE,
            self.shape,
            self.device
        )
    }
}

fn numel_of(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            Error::invalid(format!(
                "shape {shape:?} has more elements than fit in memory"
            ))
        })
}

impl<T: Element> Tensor<T> {
    /// A zero-filled tensor on `be`'s device.
    pub fn zeros(be: &Backend, shape: &[usize]) -> Result<Self> {
        let n = numel_of(shape)?;
        let storage = match &be.inner {
            Inner::Cpu | Inner::Emulated => Storage::Host(vec![T::default(); n]),
            Inner::Cuda(c) => Storage::Cuda(c.stream().alloc_zeros::<T>(n).map_err(|e| {
                Error::cuda(
                    format!(
                        "allocating {} bytes for a {shape:?} tensor",
                        n * std::mem::size_of::<T>()
                    ),
                    e,
                )
            })?),
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            device: be.device(),
            storage,
        })
    }

    /// A tensor holding `data` (row-major) with `shape`, on `be`'s device.
    pub fn from_vec(be: &Backend, shape: &[usize], data: Vec<T>) -> Result<Self> {
        let n = numel_of(shape)?;
        if n != data.len() {
            return Err(Error::invalid(format!(
                "shape {shape:?} needs {n} values but {} were given",
                data.len()
            )));
        }
        let storage =
            match &be.inner {
                Inner::Cpu | Inner::Emulated => Storage::Host(data),
                Inner::Cuda(c) => Storage::Cuda(c.stream().clone_htod(&data).map_err(|e| {
                    Error::cuda(format!("copying a {shape:?} tensor to the GPU"), e)
                })?),
            };
        Ok(Tensor {
            shape: shape.to_vec(),
            device: be.device(),
            storage,
        })
    }

    /// Like [`Tensor::from_vec`] from a borrowed slice.
    pub fn from_slice(be: &Backend, shape: &[usize], data: &[T]) -> Result<Self> {
        Self::from_vec(be, shape, data.to_vec())
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The device the data lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n = numel_of(shape)?;
        if n != self.numel() {
            return Err(Error::invalid(format!(
                "cannot reshape {:?} ({} values) to {shape:?} ({n} values)",
                self.shape,
                self.numel()
            )));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Copies the data to the host (waits for queued GPU work).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        match &self.storage {
            Storage::Host(v) => Ok(v.clone()),
            Storage::Cuda(s) => s.stream().clone_dtoh(s).map_err(|e| {
                Error::cuda(format!("copying a {:?} tensor from the GPU", self.shape), e)
            }),
        }
    }

    /// Copies the tensor to `be`'s device.
    pub fn to_device(&self, be: &Backend) -> Result<Self> {
        match (&self.storage, &be.inner) {
            (Storage::Host(v), _) => Self::from_slice(be, &self.shape, v),
            (Storage::Cuda(_), _) => Self::from_vec(be, &self.shape, self.to_vec()?),
        }
    }

    /// The host data for CPU and emulated tensors; `None` on a GPU.
    pub fn host(&self) -> Option<&[T]> {
        match &self.storage {
            Storage::Host(v) => Some(v),
            Storage::Cuda(_) => None,
        }
    }

    /// Mutable host data for CPU and emulated tensors; `None` on a GPU.
    pub fn host_mut(&mut self) -> Option<&mut [T]> {
        match &mut self.storage {
            Storage::Host(v) => Some(v),
            Storage::Cuda(_) => None,
        }
    }

    /// Host data or an error naming the op (for the CPU path).
    pub(crate) fn host_for(&self, op: &'static str) -> Result<&[T]> {
        self.host()
            .ok_or_else(|| Error::invalid(format!("{op}: a GPU tensor was passed to the CPU path")))
    }

    /// Mutable host data or an error naming the op.
    pub(crate) fn host_mut_for(&mut self, op: &'static str) -> Result<&mut [T]> {
        self.host_mut()
            .ok_or_else(|| Error::invalid(format!("{op}: a GPU tensor was passed to the CPU path")))
    }

    /// The buffer's address as a kernel argument (device address on CUDA,
    /// host address on the emulated device). Reading through it is the
    /// kernel's business; the tensor must outlive the launch.
    pub(crate) fn arg(&self) -> KernelArg {
        match &self.storage {
            Storage::Host(v) => KernelArg::Ptr(v.as_ptr() as u64),
            Storage::Cuda(s) => {
                let (ptr, _sync) = s.device_ptr(s.stream());
                KernelArg::Ptr(ptr)
            }
        }
    }

    /// As [`Tensor::arg`], for a buffer the kernel writes.
    pub(crate) fn arg_mut(&mut self) -> KernelArg {
        match &mut self.storage {
            Storage::Host(v) => KernelArg::Ptr(v.as_mut_ptr() as u64),
            Storage::Cuda(s) => {
                let stream = s.stream().clone();
                let (ptr, _sync) = s.device_ptr_mut(&stream);
                KernelArg::Ptr(ptr)
            }
        }
    }

    /// Consumes a host tensor into its data without copying.
    pub fn into_vec(self) -> Result<Vec<T>> {
        match self.storage {
            Storage::Host(v) => Ok(v),
            Storage::Cuda(_) => self.to_vec(),
        }
    }

    /// The data as an ndarray (copied to the host).
    pub fn to_ndarray(&self) -> Result<ndarray::ArrayD<T>> {
        ndarray::ArrayD::from_shape_vec(self.shape.clone(), self.to_vec()?)
            .map_err(|e| Error::invalid(format!("tensor {:?} to ndarray: {e}", self.shape)))
    }

    /// A tensor on `be`'s device from an ndarray of any layout.
    pub fn from_ndarray(be: &Backend, a: &ndarray::ArrayD<T>) -> Result<Self> {
        let data: Vec<T> = a.iter().copied().collect();
        Self::from_vec(be, a.shape(), data)
    }
}

/// Checks that `t` lives on `be`'s device.
pub(crate) fn check_device<T: Element>(
    op: &'static str,
    be: &Backend,
    t: &Tensor<T>,
) -> Result<()> {
    if t.device() != be.device() {
        return Err(Error::DeviceMismatch {
            op,
            a: be.device().to_string(),
            b: t.device().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_roundtrip_and_reshape() {
        let be = Backend::cpu();
        let t = Tensor::from_vec(&be, &[2, 3], vec![1.0f32, 2., 3., 4., 5., 6.]).unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        let t = t.reshape(&[3, 2]).unwrap();
        assert_eq!(t.to_vec().unwrap(), vec![1.0, 2., 3., 4., 5., 6.]);
        assert!(Tensor::from_vec(&be, &[2, 2], vec![1.0f32; 3]).is_err());
        assert!(Tensor::<f32>::zeros(&be, &[3])
            .unwrap()
            .reshape(&[4])
            .is_err());
    }
}
