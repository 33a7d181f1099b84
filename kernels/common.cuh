// Included first by every kernel file. Makes one source serve two builds:
// - nvcc (fatbin for the GPU): plain CUDA; CM_EXPORT expands to nothing.
// - CELLMORPH_EMULATION (g++ -x c++, see emulation/cuda_emu.h): CUDA keywords
//   become host C++ and CM_EXPORT(name) defines
//     extern "C" int cm_emu_launch_<name>(const cm_emu_launch_cfg* cfg,
//                                         void** args, char* err, size_t err_len)
//   which runs the kernel over the whole grid on the CPU. `args` is the
//   driver-style kernelParams array (args[i] points to parameter i); the
//   result is 0, or nonzero with a NUL-terminated message in `err`.
//
// Usage:
//   extern "C" __global__ void my_kernel(const float* x, float* y, int n) {
//     CM_DYNAMIC_SHARED(float, tile);  // dynamic shared memory, if any
//     ...
//   }
//   CM_EXPORT(my_kernel)
//
// Tensor-core and inline-PTX code goes under #ifndef CELLMORPH_EMULATION.
// Kernel files include standard headers only through this file.
#pragma once

#ifdef CELLMORPH_EMULATION

#include "emulation/cuda_emu.h"

#define CM_EXPORT(name)                                                                       \
  extern "C" int cm_emu_launch_##name(const cm_emu_launch_cfg* cfg, void** args, char* err,   \
                                      size_t err_len) {                                       \
    return ::cm_emu::launch(cfg, args, &::cm_emu::thunk<&name>, #name, err, err_len);         \
  }
#define CM_DYNAMIC_SHARED(T, name) T* const name = ::cm_emu::detail::dynamic_shared<T>()

#else

#define CM_EXPORT(name)
#define CM_DYNAMIC_SHARED(T, name) extern __shared__ T name[]

#endif
