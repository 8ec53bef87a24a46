// Standalone timing / Nsight Compute harness for jint4's elementwise CUDA
// handlers, without JAX: each probe_*.cu includes one handler file and calls
// its *Impl functions on device buffers wrapped as XLA FFI buffers, with a
// scratch allocator served by a fake XLA_FFI_Api (only DeviceMemory_Allocate
// and _Free are filled). Built by build.sh; see main.cu for the usage.
#ifndef JINT4_TOOLS_KERNEL_PROBE_PROBE_H_
#define JINT4_TOOLS_KERNEL_PROBE_PROBE_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace probe {

namespace ffi = ::xla::ffi;

inline void CudaCheck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}

inline void FfiCheck(const ffi::Error& e, const char* what) {
  if (e.failure()) {
    std::fprintf(stderr, "FFI error in %s: %s\n", what, e.message().c_str());
    std::exit(3);
  }
}

// A device tensor described as an XLA_FFI_Buffer; owns its device memory
// (from DevAlloc / Random*; freed with the Buf).
struct Buf {
  std::vector<int64_t> dims;
  XLA_FFI_Buffer b{};
  Buf() = default;
  Buf(ffi::DataType t, std::vector<int64_t> d, void* data) : dims(std::move(d)) {
    b.struct_size = sizeof(XLA_FFI_Buffer);
    b.dtype = static_cast<XLA_FFI_DataType>(t);
    b.data = data;
    b.rank = static_cast<int64_t>(dims.size());
    b.dims = dims.data();
  }
  ~Buf() { cudaFree(b.data); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ffi::AnyBuffer any() const { return ffi::AnyBuffer(&b); }
  ffi::Result<ffi::AnyBuffer> out() const { return ffi::Result<ffi::AnyBuffer>(any()); }
};

inline void* DevAlloc(size_t bytes) {
  void* p = nullptr;
  CudaCheck(cudaMalloc(&p, bytes < 256 ? 256 : bytes), "cudaMalloc");
  CudaCheck(cudaMemset(p, 0, bytes < 256 ? 256 : bytes), "cudaMemset");
  return p;
}

// Scratch: one pool, reset at every handler call (stream-ordered reuse).
inline char*& ScratchPool() { static char* p = static_cast<char*>(DevAlloc(64 << 20)); return p; }
inline size_t& ScratchUsed() { static size_t used = 0; return used; }

inline XLA_FFI_Error* FakeAllocate(XLA_FFI_DeviceMemory_Allocate_Args* a) {
  size_t off = (ScratchUsed() + 255) & ~size_t{255};
  if (off + a->size > (size_t{64} << 20)) { a->data = nullptr; return nullptr; }
  a->data = ScratchPool() + off;
  ScratchUsed() = off + a->size;
  return nullptr;
}
inline XLA_FFI_Error* FakeFree(XLA_FFI_DeviceMemory_Free_Args*) { return nullptr; }

inline const XLA_FFI_Api* FakeApi() {
  static XLA_FFI_Api api = [] {
    XLA_FFI_Api a{};
    a.struct_size = sizeof(XLA_FFI_Api);
    a.XLA_FFI_DeviceMemory_Allocate = FakeAllocate;
    a.XLA_FFI_DeviceMemory_Free = FakeFree;
    return a;
  }();
  return &api;
}

inline ffi::DiagnosticEngine& Diagnostics() { static ffi::DiagnosticEngine d; return d; }

inline ffi::ScratchAllocator Scratch() {
  ScratchUsed() = 0;
  return *ffi::CtxDecoding<ffi::ScratchAllocator>::Decode(FakeApi(), nullptr, Diagnostics());
}

// Options shared by the probes.
struct Options {
  bool once = false;  // run every case once, no timing (for ncu)
  int inner = 10;     // calls per timed sample
  int reps = 7;       // samples (the median is reported)
};
inline Options& Opts() { static Options o; return o; }

// Median over reps of the mean per-call time (ms) of `inner` back-to-back
// calls of f, after two warm-up calls; prints name, ms and GB/s for `bytes`.
template <typename F>
double Time(const char* name, double bytes, F&& f) {
  f();
  CudaCheck(cudaDeviceSynchronize(), name);
  if (Opts().once) {
    std::printf("%-34s ran once\n", name);
    return 0.0;
  }
  f();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ms;
  for (int r = 0; r < Opts().reps; ++r) {
    cudaEventRecord(a);
    for (int i = 0; i < Opts().inner; ++i) f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float t = 0.f;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t / Opts().inner);
  }
  CudaCheck(cudaGetLastError(), name);
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2];
  std::printf("%-34s %8.4f ms  %7.0f GB/s  (%.0f MB moved)\n", name, med,
              bytes / (med * 1e-3) / 1e9, bytes / 1e6);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return med;
}

// Shapes: x[N, D] (activations), kernel[D, C], g[N, C].
struct Shape {
  int64_t N, D, C;
};

void RunQuantize(const Shape& s);
void RunBitSplit(const Shape& s);
void RunResidualValues(const Shape& s);
void RunLsqBackward(const Shape& s);
void RunLsqWeightBackward(const Shape& s);

// Random bf16 / f32 device tensors (fixed seed).
void* RandomBf16(int64_t count, uint32_t seed, float scale);
void* RandomF32(int64_t count, uint32_t seed, float scale);

}  // namespace probe

#endif  // JINT4_TOOLS_KERNEL_PROBE_PROBE_H_
