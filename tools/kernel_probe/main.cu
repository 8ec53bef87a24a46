// kernel_probe: times jint4's elementwise CUDA handlers at one layer shape
// (x[N, D], kernel[D, C], g[N, C]) without JAX, or runs each once for
// Nsight Compute.
//   ./kernel_probe [N D C] [--once] [--only quantize|split|lsq|copy]
#include <cuda_bf16.h>

#include <cstring>

#include "probe.h"

namespace probe {
namespace {

__device__ __forceinline__ uint32_t Mix(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
  return x;
}

__global__ void FillBf16(__nv_bfloat16* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float u = (Mix(static_cast<uint32_t>(i) * 2654435761u ^ seed) >> 8) * (1.0f / 16777216.0f);
    p[i] = __float2bfloat16_rn((2.0f * u - 1.0f) * scale);
  }
}

__global__ void FillF32(float* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float u = (Mix(static_cast<uint32_t>(i) * 2654435761u ^ seed) >> 8) * (1.0f / 16777216.0f);
    p[i] = (2.0f * u - 1.0f) * scale;
  }
}

}  // namespace

void* RandomBf16(int64_t count, uint32_t seed, float scale) {
  void* p = DevAlloc(2 * count);
  FillBf16<<<4096, 256>>>(static_cast<__nv_bfloat16*>(p), count, seed, scale);
  CudaCheck(cudaDeviceSynchronize(), "FillBf16");
  return p;
}

void* RandomF32(int64_t count, uint32_t seed, float scale) {
  void* p = DevAlloc(4 * count);
  FillF32<<<4096, 256>>>(static_cast<float*>(p), count, seed, scale);
  CudaCheck(cudaDeviceSynchronize(), "FillF32");
  return p;
}

}  // namespace probe

int main(int argc, char** argv) {
  probe::Shape s{16384, 4096, 4096};
  std::string only;
  int pos = 0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--once")) {
      probe::Opts().once = true;
    } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
      only = argv[++i];
    } else if (pos < 3) {
      const int64_t v = std::atoll(argv[i]);
      (pos == 0 ? s.N : pos == 1 ? s.D : s.C) = v;
      ++pos;
    }
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("kernel_probe on %s, N=%lld D=%lld C=%lld\n", prop.name,
              static_cast<long long>(s.N), static_cast<long long>(s.D),
              static_cast<long long>(s.C));
  if (only.empty() || only == "copy") {
    // Bandwidth reference: a device-to-device copy of a bf16 [N, D].
    const size_t bytes = 2 * s.N * s.D;
    void* a = probe::DevAlloc(bytes);
    void* b = probe::DevAlloc(bytes);
    probe::Time("memcpy bf16 [N,D] (read+write)", 2.0 * bytes,
                [&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice); });
    cudaFree(a);
    cudaFree(b);
  }
  if (only.empty() || only == "quantize") probe::RunQuantize(s);
  if (only.empty() || only == "split") probe::RunBitSplit(s);
  if (only.empty() || only == "lsq") {
    probe::RunResidualValues(s);
    probe::RunLsqBackward(s);
    probe::RunLsqWeightBackward(s);
  }
  return 0;
}
