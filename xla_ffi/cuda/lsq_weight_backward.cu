// jint4_lsq_weight_backward (CUDA): LSQ's backward of a kernel[D, C] quantized
// with the Hadamard down its columns (v = (+-1 transform of the kernel times
// Pow2(-L)) * QuantFactor * Pow2(L); dk = (+-1 transform of the masked grad
// times Pow2(-L)) * HadamardScale * Pow2(L): the float contract of
// jint4_math.h, one multiply per element on load and one at the end of each
// transform). Blocks of at most 16 rows: one thread per column, tiles in
// registers (LsqWeightBackwardColumnsRegKernel); 32 rows: two threads per
// column, 16 rows each (LsqWeightBackwardColumnsPairKernel); larger blocks:
// column tiles in shared memory (LsqWeightBackwardKernel).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/jint4_math.h"
#include "cuda_common.h"
#include "cuda_ffi.h"
#include "device_util.cuh"
#include "handlers.h"

namespace jint4 {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// LSQ's backward for one kernel element with v = its column transform *
// QuantFactor and g its grad: adds g * delta(v) to *acc and returns the
// STE-masked g (lsq.py in_range and delta: inside [-qn, qp]; delta = the clip
// value outside, RoundEven(v) - v inside).
__device__ __forceinline__ float WeightMaskDelta(float v, float g, int qn, int qp, float* acc) {
  const bool inside = (v >= -qn) && (v <= qp);
  const float delta = v < -qn ? -static_cast<float>(qn)
                              : (v > qp ? static_cast<float>(qp) : RoundEven(v) - v);
  *acc = *acc + g * delta;
  return inside ? g : 0.0f;
}

// axis-0 register path (max_log2 <= 4; 32 rows: the pair kernel below):
// thread = column c (consecutive
// threads: consecutive columns, coalesced), kTiles consecutive tiles of TR =
// 2^max_log2 rows per step (at least 8 rows, so enough loads are in flight).
// It loads the TR kernel and TR grad values of each tile at once (the first
// tile unconditionally: it starts below R), RegisterHadamard on the kernel
// (times Pow2(-L)), v = (k * QuantFactor) * Pow2(L), the delta term and the
// STE mask as LsqWeightBackwardKernel, RegisterHadamard on the masked grad,
// and stores the dk rows, converted as they are produced. Tiles past R
// (R % TR == 0) are skipped whole. One column per thread: two, for 128-byte
// warp accesses of a 16-bit kernel, reached less of the memory bandwidth
// on Hopper (BENCHMARKS.md, Operators).
constexpr int kColThreads = 256;

template <typename T, typename G, int TR>
__global__ void __launch_bounds__(kColThreads)
LsqWeightBackwardColumnsRegKernel(const G* __restrict__ grad,
                                  const T* __restrict__ kernel, int64_t R, int64_t S,
                                  const float* __restrict__ step_ptr,
                                  const int32_t* __restrict__ log2_ptr, int max_log2,
                                  int qn, int qp, T* __restrict__ dk,
                                  float* __restrict__ delta_sum) {
  constexpr int kTiles = TR >= 8 ? 1 : 8 / TR;
  constexpr int kRows = TR * kTiles;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float factor = QuantFactor(L, *step_ptr);
  const float scale = HadamardScale(L);
  const float down = Pow2(-L), up = Pow2(L);  // the float contract
  const int64_t steps = CeilDivDev(R, kRows);
  float acc = 0.0f;
  if (c < S) {  // no early return: BlockSumToGlobal has a barrier
    for (int64_t rs = blockIdx.y; rs < steps; rs += gridDim.y) {
      const int64_t r0 = rs * kRows;
      bool live[kTiles];
      float kv[kRows], gv[kRows];
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
        live[u] = u == 0 || r0 + u * TR < R;  // whole tiles: TR divides R
#pragma unroll
        for (int i = u * TR; i < (u + 1) * TR; ++i) {
          kv[i] = 0.0f;
          gv[i] = 0.0f;
          if (live[u]) {
            const int64_t e = (r0 + i) * S + c;
            kv[i] = ToFloat(kernel[e]) * down;
            gv[i] = ToFloat(grad[e]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kTiles; ++u) RegisterHadamard<TR>(kv + u * TR, L);
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
        if (!live[u]) continue;
#pragma unroll
        for (int i = u * TR; i < (u + 1) * TR; ++i) {
          gv[i] = WeightMaskDelta((kv[i] * factor) * up, gv[i], qn, qp, &acc) * down;
        }
      }
      T out[kRows];
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
        RegisterHadamard<TR>(gv + u * TR, L);
#pragma unroll
        for (int i = u * TR; i < (u + 1) * TR; ++i) out[i] = FromFloat<T>((gv[i] * scale) * up);
      }
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
        if (!live[u]) continue;
#pragma unroll
        for (int i = u * TR; i < (u + 1) * TR; ++i) dk[(r0 + i) * S + c] = out[i];
      }
    }
  }
  BlockSumToGlobal<kColThreads>(acc, delta_sum);  // any summation order is allowed
}

// max_log2 == 5: the 32-row tile of a column split over two threads, rows
// 0-15 in warps 0-3 and rows 16-31 in warps 4-7 (the same lane of warps w
// and w + 4: the same column), so a thread holds 16 kernel and 16 grad
// values and twice as many warps fit on an SM (one thread per column needs
// about 100 registers at 32 rows, which held that kernel to a quarter of the
// SM's warps: latency-bound). A warp's row access stays 32 consecutive
// columns (two lanes per column within a warp, 16 columns per row access,
// measured twice as slow for 16-bit types on an H200). Hadamard stages 0-3
// run in registers, stage 4 (rows i and i + 16) through shared memory: the
// lower thread keeps a + b, the upper one a - b (Butterfly's two results,
// bit-identical); otherwise as LsqWeightBackwardColumnsRegKernel. Block: 128
// columns. R % 32 == 0.
constexpr int kPairCols = kColThreads / 2;

// Stage 4 of a 32-row column split as above: v holds rows 16 upper .. +15;
// x is the block's exchange buffer [2][16][kPairCols]. Starts and ends with
// a barrier.
__device__ __forceinline__ void ExchangeStage4(float* v, float (*x)[16][kPairCols], int upper,
                                               int col) {
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 16; ++i) x[upper][i][col] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float other = x[1 - upper][i][col];
    v[i] = upper ? other - v[i] : v[i] + other;
  }
}

template <typename T, typename G>
__global__ void __launch_bounds__(kColThreads)
LsqWeightBackwardColumnsPairKernel(const G* __restrict__ grad, const T* __restrict__ kernel,
                                   int64_t R, int64_t S, const float* __restrict__ step_ptr,
                                   const int32_t* __restrict__ log2_ptr, int qn, int qp,
                                   T* __restrict__ dk, float* __restrict__ delta_sum) {
  __shared__ float x[2][16][kPairCols];
  const int upper = threadIdx.x >= kPairCols;  // warps 4-7: rows 16-31
  const int col = threadIdx.x & (kPairCols - 1);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kPairCols + col;
  const bool col_ok = c < S;  // the same for both threads of a column
  const int L = ClampedLog2(log2_ptr, 5);
  const float factor = QuantFactor(L, *step_ptr);
  const float scale = HadamardScale(L);
  const float down = Pow2(-L), up = Pow2(L);  // the float contract
  const int64_t tiles = R >> 5;
  float acc = 0.0f;
  for (int64_t rt = blockIdx.y; rt < tiles; rt += gridDim.y) {  // uniform: barriers below
    const int64_t r0 = (rt << 5) + 16 * upper;
    // All 32 loads in flight before any is used (raw values first: converted
    // on arrival, they would be issued pair by pair).
    T kraw[16];
    G graw[16];
    if (col_ok) {
      const T* kp = kernel + r0 * S + c;
      const G* gp = grad + r0 * S + c;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        kraw[i] = kp[i * S];
        graw[i] = gp[i * S];
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        kraw[i] = FromFloat<T>(0.0f);
        graw[i] = FromFloat<G>(0.0f);
      }
    }
    float kv[16], gv[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      kv[i] = ToFloat(kraw[i]) * down;
      gv[i] = ToFloat(graw[i]);
    }
    RegisterHadamard<16>(kv, L);
    if (L > 4) ExchangeStage4(kv, x, upper, col);  // L uniform
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      gv[i] = WeightMaskDelta((kv[i] * factor) * up, gv[i], qn, qp, &acc) * down;
    }
    RegisterHadamard<16>(gv, L);
    if (L > 4) ExchangeStage4(gv, x, upper, col);
    if (col_ok) {
#pragma unroll
      for (int i = 0; i < 16; ++i) dk[(r0 + i) * S + c] = FromFloat<T>((gv[i] * scale) * up);
    }
  }
  BlockSumToGlobal<kColThreads>(acc, delta_sum);  // any summation order is allowed
}

// The register kernels for max_log2 <= 5 (grid: column blocks x row steps).
template <typename T, typename G>
void LaunchWeightColumnsReg(int max_log2, cudaStream_t stream, const G* grad,
                            const T* kernel, int64_t R, int64_t S, const float* step,
                            const int32_t* log2, int qn, int qp, T* dk, float* sum) {
  const int64_t cols = max_log2 == 5 ? kPairCols : kColThreads;
  const int rows_per_step = max_log2 >= 3 ? (1 << max_log2) : 8;  // the kernels' kRows
  const int64_t steps = CeilDiv(R, rows_per_step);
  const dim3 grid(static_cast<unsigned>(CeilDiv(S, cols)),
                  static_cast<unsigned>(steps < 65535 ? steps : 65535));
  switch (max_log2) {
#define JINT4_WCOLS_CASE(LG)                                                             \
  case LG:                                                                               \
    LsqWeightBackwardColumnsRegKernel<T, G, 1 << LG><<<grid, kColThreads, 0, stream>>>(  \
        grad, kernel, R, S, step, log2, max_log2, qn, qp, dk, sum);                      \
    break;
    JINT4_WCOLS_CASE(0)
    JINT4_WCOLS_CASE(1)
    JINT4_WCOLS_CASE(2)
    JINT4_WCOLS_CASE(3)
    JINT4_WCOLS_CASE(4)
#undef JINT4_WCOLS_CASE
    case 5:
      LsqWeightBackwardColumnsPairKernel<T, G><<<grid, kColThreads, 0, stream>>>(
          grad, kernel, R, S, step, log2, qn, qp, dk, sum);
      break;
    default: break;
  }
}

// Kernel side: tiles of 2^max_log2 rows x kColTile / 2^max_log2 columns of
// kernel[D, C] and grad[D, C], column-major in shared memory (as the axis-0
// quantize in quantize.cu), so each column segment is whole Hadamard blocks;
// one pad float per column (Padded) keeps the row-wise accesses conflict-free.
constexpr int kColTile = 2048;

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
LsqWeightBackwardKernel(const G* __restrict__ grad, const T* __restrict__ kernel,
                        int64_t R, int64_t S, const float* __restrict__ step_ptr,
                        const int32_t* __restrict__ log2_ptr, int max_log2, int qn, int qp,
                        T* __restrict__ dk, float* __restrict__ delta_sum) {
  __shared__ float sk[2 * kColTile];
  __shared__ float sg[2 * kColTile];
  const int TR = 1 << max_log2;
  const int TC = kColTile / TR;
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float factor = QuantFactor(L, *step_ptr);
  const float scale = HadamardScale(L);
  const float down = Pow2(-L), up = Pow2(L);  // the float contract
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * TC;
  const int64_t row_tiles = R / TR;
  float acc = 0.0f;
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * TR;
    for (int i = threadIdx.x; i < kColTile; i += kThreads) {
      const int r = i / TC;
      const int c = i - r * TC;
      const bool in = c0 + c < S;
      const int64_t e = (r0 + r) * S + c0 + c;
      const int p = Padded(c * TR + r, max_log2);
      sk[p] = in ? ToFloat(kernel[e]) * down : 0.0f;
      sg[p] = in ? ToFloat(grad[e]) : 0.0f;
    }
    BlockHadamardSmem<kThreads>(sk, kColTile, L, max_log2);
    for (int i = threadIdx.x; i < kColTile; i += kThreads) {
      const int p = Padded(i, max_log2);
      sg[p] = WeightMaskDelta((sk[p] * factor) * up, sg[p], qn, qp, &acc) * down;
    }
    BlockHadamardSmem<kThreads>(sg, kColTile, L, max_log2);
    for (int i = threadIdx.x; i < kColTile; i += kThreads) {
      const int r = i / TC;
      const int c = i - r * TC;
      if (c0 + c < S) {
        dk[(r0 + r) * S + c0 + c] =
            FromFloat<T>((sg[Padded(c * TR + r, max_log2)] * scale) * up);
      }
    }
    __syncthreads();
  }
  BlockSumToGlobal<kThreads>(acc, delta_sum);  // any summation order is allowed
}

ffi::Error LsqWeightBackwardImpl(cudaStream_t stream, ffi::AnyBuffer grad,
                                 ffi::AnyBuffer kernel, ffi::AnyBuffer step,
                                 ffi::AnyBuffer log2_block, ffi::Result<ffi::AnyBuffer> dk,
                                 ffi::Result<ffi::AnyBuffer> delta_sum, int32_t qn, int32_t qp,
                                 int32_t log2_hint) {
  const FloatKind kind = KindOf(kernel.element_type());
  const bool grad_bf16 = grad.element_type() == ffi::DataType::BF16;
  if ((grad.element_type() != ffi::DataType::F32 && !grad_bf16) || kind == FloatKind::kInvalid ||
      dk->element_type() != kernel.element_type() ||
      step.element_type() != ffi::DataType::F32 ||
      log2_block.element_type() != ffi::DataType::S32 ||
      delta_sum->element_type() != ffi::DataType::F32) {
    return InvalidArgument("lsq_weight_backward: grad f32/bf16, kernel f32/bf16/f16, dk of the"
                           " kernel's dtype, step f32, log2_block s32, delta_sum f32");
  }
  ffi::Error range = CheckQuantRange(qn, qp, "lsq_weight_backward");
  if (range.failure()) return range;
  auto gd = grad.dimensions();
  auto kd = kernel.dimensions();
  auto dd = dk->dimensions();
  if (gd.size() != 2 || kd.size() != 2 || dd.size() != 2 || gd[0] != kd[0] ||
      gd[1] != kd[1] || dd[0] != kd[0] || dd[1] != kd[1] || step.element_count() != 1 ||
      log2_block.element_count() != 1 || delta_sum->element_count() != 1) {
    return InvalidArgument("lsq_weight_backward: grad, kernel and dk must be [D, C];"
                           " step, log2_block and delta_sum scalars");
  }
  const int64_t R = kd[0], S = kd[1];
  float* sum = reinterpret_cast<float*>(delta_sum->untyped_data());
  ffi::Error err = CheckCuda("lsq_weight_backward memset",
                             cudaMemsetAsync(sum, 0, sizeof(float), stream));
  if (err.failure()) return err;
  if (R * S == 0) return ffi::Error::Success();
  int max_log2;
  dim3 grid;
  if (!ColumnTiling(R, S, log2_hint, kColTile, &max_log2, &grid)) {
    return InvalidArgument("lsq_weight_backward: too large");
  }
  const void* grad_p = grad.untyped_data();
  const float* step_p = reinterpret_cast<const float*>(step.untyped_data());
  const int32_t* log2_p = reinterpret_cast<const int32_t*>(log2_block.untyped_data());
  // (ColumnTiling caps max_log2 at the static block, so a traced block
  // larger than 32 rows takes the shared-memory kernel below.)
  if (max_log2 <= 5) {
    if (CeilDiv(S, kPairCols) > 0x7FFFFFFF) return InvalidArgument("lsq_weight_backward: too large");
    DispatchFloat(kind, [&](auto tag) {
      using T = decltype(tag);
      const T* k_p = reinterpret_cast<const T*>(kernel.untyped_data());
      T* dk_p = reinterpret_cast<T*>(dk->untyped_data());
      if (grad_bf16) {
        LaunchWeightColumnsReg<T>(max_log2, stream, static_cast<const __nv_bfloat16*>(grad_p),
                                  k_p, R, S, step_p, log2_p, qn, qp, dk_p, sum);
      } else {
        LaunchWeightColumnsReg<T>(max_log2, stream, static_cast<const float*>(grad_p), k_p, R, S,
                                  step_p, log2_p, qn, qp, dk_p, sum);
      }
    });
    return CheckLaunch("lsq_weight_backward kernel launch");
  }
  DispatchFloat(kind, [&](auto tag) {
    using T = decltype(tag);
    const T* k_p = reinterpret_cast<const T*>(kernel.untyped_data());
    T* dk_p = reinterpret_cast<T*>(dk->untyped_data());
    if (grad_bf16) {
      LsqWeightBackwardKernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(grad_p), k_p, R, S, step_p, log2_p, max_log2, qn, qp,
          dk_p, sum);
    } else {
      LsqWeightBackwardKernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(grad_p), k_p, R, S, step_p, log2_p, max_log2, qn, qp, dk_p,
          sum);
    }
  });
  return CheckLaunch("lsq_weight_backward kernel launch");
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_lsq_weight_backward, jint4::cuda::LsqWeightBackwardImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()     // grad f32 | bf16 [D, C]
        .Arg<xla::ffi::AnyBuffer>()     // kernel f32 | bf16 | f16 [D, C]
        .Arg<xla::ffi::AnyBuffer>()     // step f32[]
        .Arg<xla::ffi::AnyBuffer>()     // log2_block s32[]
        .Ret<xla::ffi::AnyBuffer>()     // dk [D, C], the kernel's dtype
        .Ret<xla::ffi::AnyBuffer>()     // delta_sum f32[]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp")
        .Attr<int32_t>("log2_hint"));
