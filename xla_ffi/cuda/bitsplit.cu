// jint4_bit_split (CUDA): g f32[R, C] -> hi, lo s8[R, C], scales f32[2],
// hi_norm, lo_norm f32[R].
//
//   pass 0: cudaMemsetAsync of the scratch (max bits, per-row integer sums).
//   pass 1: m = max|g| with NaN propagation. |g| with the sign bit cleared is a
//           non-negative float or a NaN; as uint32 bit patterns, non-negative
//           floats order like their values and every NaN pattern (> 0x7F800000)
//           is above +Inf, so an unsigned atomicMax over the bit patterns gives
//           max|g|, or a NaN if any element is NaN.
//   pass 2: SplitValue per element (f = 98 / SafeMax(m), noise Uniform(i));
//           the integer sums of hi^2 and lo^2 per row (exact in int32 for
//           C < 2^31 / 49), one block per (row, column chunk), atomicAdd.
//   pass 3: scales = {m * fl(1/7), m * fl(1/98)}; norms = scale * sqrt(sum).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/jint4_math.h"
#include "cuda_common.h"
#include "cuda_ffi.h"
#include "handlers.h"

namespace jint4 {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;
constexpr int kSplitCols = 4096;  // columns per block in pass 2

__device__ __forceinline__ uint32_t WarpMaxU32(uint32_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const uint32_t o = __shfl_down_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

__device__ __forceinline__ int WarpSumI32(int v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

__global__ void __launch_bounds__(kThreads)
AbsMaxBitsKernel(const float* __restrict__ g, int64_t total,
                 unsigned int* __restrict__ max_bits) {
  __shared__ uint32_t warp_max[kThreads / 32];
  uint32_t m = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < total; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t bits = __float_as_uint(g[i]) & 0x7FFFFFFFu;
    m = bits > m ? bits : m;
  }
  m = WarpMaxU32(m);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();
  if (warp == 0) {
    uint32_t v = lane < (kThreads / 32) ? warp_max[lane] : 0u;
    v = WarpMaxU32(v);
    if (lane == 0) atomicMax(max_bits, v);
  }
}

__global__ void __launch_bounds__(kThreads)
SplitKernel(const float* __restrict__ g, int64_t rows, int64_t cols,
            int64_t chunks_per_row, const unsigned int* __restrict__ max_bits,
            const uint32_t* __restrict__ seed, int8_t* __restrict__ hi,
            int8_t* __restrict__ lo, int* __restrict__ sums /* [2, rows] */) {
  __shared__ int warp_hi[kThreads / 32];
  __shared__ int warp_lo[kThreads / 32];
  const int64_t r = blockIdx.x / chunks_per_row;
  const int64_t c0 = (blockIdx.x % chunks_per_row) * kSplitCols;
  const int64_t c1 = c0 + kSplitCols < cols ? c0 + kSplitCols : cols;
  const float m = __uint_as_float(*max_bits);
  const float f = kSplitRange / SafeMax(m);
  const uint32_t seed0 = seed[0];
  const uint32_t seed1 = seed[1];
  int s_hi = 0, s_lo = 0;
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kThreads) {
    const int64_t e = r * cols + c;
    int8_t h, l;
    SplitValue(g[e], f, Uniform(seed0, seed1, static_cast<uint32_t>(e)), &h, &l);
    hi[e] = h;
    lo[e] = l;
    s_hi += static_cast<int>(h) * static_cast<int>(h);
    s_lo += static_cast<int>(l) * static_cast<int>(l);
  }
  s_hi = WarpSumI32(s_hi);
  s_lo = WarpSumI32(s_lo);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_hi[warp] = s_hi;
    warp_lo[warp] = s_lo;
  }
  __syncthreads();
  if (warp == 0) {
    int vh = lane < (kThreads / 32) ? warp_hi[lane] : 0;
    int vl = lane < (kThreads / 32) ? warp_lo[lane] : 0;
    vh = WarpSumI32(vh);
    vl = WarpSumI32(vl);
    if (lane == 0) {
      atomicAdd(&sums[r], vh);
      atomicAdd(&sums[rows + r], vl);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
FinalizeKernel(int64_t rows, const unsigned int* __restrict__ max_bits,
               const int* __restrict__ sums, float* __restrict__ scales,
               float* __restrict__ hi_norm, float* __restrict__ lo_norm) {
  const float m = __uint_as_float(*max_bits);
  const float scale_lo = m * kInvSplitRange;
  const float scale_hi = m * kInvSeven;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    scales[0] = scale_hi;
    scales[1] = scale_lo;
  }
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       r < rows; r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    hi_norm[r] = scale_hi * sqrtf(static_cast<float>(sums[r]));
    lo_norm[r] = scale_lo * sqrtf(static_cast<float>(sums[rows + r]));
  }
}

ffi::Error BitSplitImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                        ffi::AnyBuffer g, ffi::AnyBuffer seed,
                        ffi::Result<ffi::AnyBuffer> hi,
                        ffi::Result<ffi::AnyBuffer> lo,
                        ffi::Result<ffi::AnyBuffer> scales,
                        ffi::Result<ffi::AnyBuffer> hi_norm,
                        ffi::Result<ffi::AnyBuffer> lo_norm) {
  if (g.element_type() != ffi::DataType::F32 ||
      seed.element_type() != ffi::DataType::U32 ||
      hi->element_type() != ffi::DataType::S8 ||
      lo->element_type() != ffi::DataType::S8 ||
      scales->element_type() != ffi::DataType::F32 ||
      hi_norm->element_type() != ffi::DataType::F32 ||
      lo_norm->element_type() != ffi::DataType::F32) {
    return InvalidArgument("bit_split: wrong dtypes");
  }
  auto dims = g.dimensions();
  if (dims.size() != 2) return InvalidArgument("bit_split: g must be [R, C]");
  const int64_t rows = dims[0];
  const int64_t cols = dims[1];
  const int64_t total = rows * cols;
  if (static_cast<int64_t>(hi->element_count()) != total ||
      static_cast<int64_t>(lo->element_count()) != total ||
      scales->element_count() != 2 ||
      static_cast<int64_t>(hi_norm->element_count()) != rows ||
      static_cast<int64_t>(lo_norm->element_count()) != rows ||
      seed.element_count() < 2) {
    return InvalidArgument("bit_split: wrong result shapes");
  }
  if (cols > (int64_t{1} << 31) / 49) {
    return InvalidArgument("bit_split: too many columns for exact int32 row sums");
  }

  // Scratch: [max_bits u32][pad to 256][sums int32[2 * rows]].
  const size_t sums_off = 256;
  const size_t bytes = sums_off + sizeof(int) * static_cast<size_t>(2 * rows);
  void* buf = nullptr;
  if (!AllocateScratch(scratch, bytes, &buf)) return ScratchError(bytes);
  unsigned int* max_bits = reinterpret_cast<unsigned int*>(buf);
  int* sums = reinterpret_cast<int*>(reinterpret_cast<char*>(buf) + sums_off);
  ffi::Error err = CheckCuda("bit_split memset", cudaMemsetAsync(buf, 0, bytes, stream));
  if (err.failure()) return err;

  const float* gp = reinterpret_cast<const float*>(g.untyped_data());
  if (total > 0) {
    int64_t blocks = CeilDiv(total, kThreads);
    if (blocks > kMaxBlocks) blocks = kMaxBlocks;
    AbsMaxBitsKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(gp, total, max_bits);
    const int64_t chunks = CeilDiv(cols, kSplitCols);
    const int64_t split_blocks = rows * chunks;
    if (split_blocks > 0x7FFFFFFF) return InvalidArgument("bit_split: too large");
    SplitKernel<<<static_cast<unsigned>(split_blocks), kThreads, 0, stream>>>(
        gp, rows, cols, chunks, max_bits,
        reinterpret_cast<const uint32_t*>(seed.untyped_data()),
        reinterpret_cast<int8_t*>(hi->untyped_data()),
        reinterpret_cast<int8_t*>(lo->untyped_data()), sums);
  }
  {
    int64_t blocks = CeilDiv(rows, kThreads);
    if (blocks > kMaxBlocks) blocks = kMaxBlocks;
    if (blocks < 1) blocks = 1;
    FinalizeKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        rows, max_bits, sums, reinterpret_cast<float*>(scales->untyped_data()),
        reinterpret_cast<float*>(hi_norm->untyped_data()),
        reinterpret_cast<float*>(lo_norm->untyped_data()));
  }
  return CheckLaunch("bit_split kernel launch");
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_bit_split, jint4::cuda::BitSplitImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()     // g f32[R, C]
        .Arg<xla::ffi::AnyBuffer>()     // seed u32[2]
        .Ret<xla::ffi::AnyBuffer>()     // hi s8[R, C]
        .Ret<xla::ffi::AnyBuffer>()     // lo s8[R, C]
        .Ret<xla::ffi::AnyBuffer>()     // scales f32[2]
        .Ret<xla::ffi::AnyBuffer>()     // hi_norm f32[R]
        .Ret<xla::ffi::AnyBuffer>()     // lo_norm f32[R]
);
