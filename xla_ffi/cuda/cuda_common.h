// Small CUDA helpers shared by jint4's CUDA handlers (no FFI dependency, so the
// CUTLASS translation units need not include the FFI headers).
#ifndef JINT4_XLA_FFI_CUDA_CUDA_COMMON_H_
#define JINT4_XLA_FFI_CUDA_CUDA_COMMON_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace jint4 {
namespace cuda {

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

inline bool IsAligned(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Compute capability and multiprocessor count of the current device, queried
// once per device (cudaGetDevice / cudaDeviceGetAttribute: no host sync).
struct DeviceInfo {
  int device = 0;
  int cc_major = 0;
  int cc_minor = 0;
  int sm_count = 0;
};

inline cudaError_t GetDeviceInfo(DeviceInfo* info) {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static DeviceInfo cache[kMaxDevices];
  static bool valid[kMaxDevices] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) {
    std::lock_guard<std::mutex> lock(mu);
    if (valid[dev]) {
      *info = cache[dev];
      return cudaSuccess;
    }
  }
  DeviceInfo d;
  d.device = dev;
  err = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) {
    std::lock_guard<std::mutex> lock(mu);
    cache[dev] = d;
    valid[dev] = true;
  }
  *info = d;
  return cudaSuccess;
}

// Error text of the last launch; clears the sticky-free error state.
inline std::string LaunchErrorMessage(const char* what, cudaError_t err) {
  return std::string("jint4 CUDA: ") + what + " failed: " + cudaGetErrorName(err) +
         ": " + cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace jint4

#endif  // JINT4_XLA_FFI_CUDA_CUDA_COMMON_H_
