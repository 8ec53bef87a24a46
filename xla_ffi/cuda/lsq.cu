// jint4_residual_values and jint4_lsq_backward (CUDA): elementwise decoders
// of the packed residual (README layout: nibble of element 2j in the low half
// of byte j; bit b of byte j of flag plane p = bit p of element 8j + b).
// Each thread handles groups of 8 consecutive elements (one flag byte, four
// nibble bytes), grid-stride.
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
constexpr int kMaxBlocks = 8192;

// Decodes element b (0..7) of a group of 8: `nib` holds the group's four
// nibble bytes (element b in bits 4b .. 4b+3), f0 / f1 its flag bytes.
__device__ __forceinline__ void DecodeInGroup(uint32_t nib, uint32_t f0, uint32_t f1,
                                              int b, int qn, int qp, int8_t* qv,
                                              bool* inside, float* delta_hat) {
  const int8_t code = NibbleToInt(static_cast<uint8_t>((nib >> (4 * b)) & 0xFu));
  const uint8_t fl = static_cast<uint8_t>(((f0 >> b) & 1u) | (((f1 >> b) & 1u) << 1));
  DecodeBackwardState(code, fl, qn, qp, qv, inside, delta_hat);
}

// The group's nibble bytes (those past the end read as 0).
__device__ __forceinline__ uint32_t LoadNibbles(const uint8_t* __restrict__ nibbles,
                                                int64_t g, int64_t total, bool vec) {
  const int64_t e0 = g << 3;
  if (vec && e0 + 8 <= total) {
    return *reinterpret_cast<const uint32_t*>(nibbles + (e0 >> 1));  // 4-aligned
  }
  uint32_t nib = 0;
  for (int k = 0; k < 4; ++k) {
    if (e0 + 2 * k < total) nib |= static_cast<uint32_t>(nibbles[(e0 >> 1) + k]) << (8 * k);
  }
  return nib;
}

// vec: nibbles 4-byte aligned and q 8-byte aligned.
__global__ void __launch_bounds__(kThreads)
ResidualValuesKernel(const uint8_t* __restrict__ nibbles,
                     const uint8_t* __restrict__ flags, int64_t plane_stride,
                     int planes, int64_t total, int qn, int qp, bool vec,
                     int8_t* __restrict__ q) {
  const int64_t groups = (total + 7) >> 3;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       g < groups; g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t f0 = flags[g];
    const uint32_t f1 = planes == 2 ? flags[plane_stride + g] : 0u;
    const uint32_t nib = LoadNibbles(nibbles, g, total, vec);
    const int64_t e0 = g << 3;
    uint32_t out[2] = {0u, 0u};
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      int8_t qv;
      bool inside;
      float dh;
      DecodeInGroup(nib, f0, f1, b, qn, qp, &qv, &inside, &dh);
      out[b >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(qv)) << (8 * (b & 3));
    }
    if (vec && e0 + 8 <= total) {
      *reinterpret_cast<uint2*>(q + e0) = make_uint2(out[0], out[1]);  // 8-aligned
    } else {
      for (int b = 0; b < 8; ++b) {
        if (e0 + b < total) q[e0 + b] = static_cast<int8_t>((out[b >> 2] >> (8 * (b & 3))) & 0xFFu);
      }
    }
  }
}

// vec: nibbles 4-byte aligned, grad and dt 16-byte aligned.
__global__ void __launch_bounds__(kThreads)
LsqBackwardKernel(const float* __restrict__ grad,
                  const uint8_t* __restrict__ nibbles,
                  const uint8_t* __restrict__ flags, int64_t plane_stride,
                  int planes, int64_t total, int qn, int qp, bool vec,
                  float* __restrict__ dt, float* __restrict__ delta_sum) {
  __shared__ float warp_sums[kThreads / 32];
  float acc = 0.0f;
  const int64_t groups = (total + 7) >> 3;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       g < groups; g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t f0 = flags[g];
    const uint32_t f1 = planes == 2 ? flags[plane_stride + g] : 0u;
    const uint32_t nib = LoadNibbles(nibbles, g, total, vec);
    const int64_t e0 = g << 3;
    const bool full = vec && e0 + 8 <= total;
    float gv[8];
    if (full) {
      const float4 a = reinterpret_cast<const float4*>(grad + e0)[0];
      const float4 b = reinterpret_cast<const float4*>(grad + e0)[1];
      gv[0] = a.x; gv[1] = a.y; gv[2] = a.z; gv[3] = a.w;
      gv[4] = b.x; gv[5] = b.y; gv[6] = b.z; gv[7] = b.w;
    } else {
#pragma unroll
      for (int b = 0; b < 8; ++b) gv[b] = e0 + b < total ? grad[e0 + b] : 0.0f;
    }
    float dv[8];
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      int8_t qv;
      bool inside;
      float dh;
      DecodeInGroup(nib, f0, f1, b, qn, qp, &qv, &inside, &dh);
      dv[b] = inside ? gv[b] : 0.0f;
      if (full || e0 + b < total) {
        const float prod = gv[b] * dh;
        acc = acc + prod;
      }
    }
    if (full) {
      reinterpret_cast<float4*>(dt + e0)[0] = make_float4(dv[0], dv[1], dv[2], dv[3]);
      reinterpret_cast<float4*>(dt + e0)[1] = make_float4(dv[4], dv[5], dv[6], dv[7]);
    } else {
      for (int b = 0; b < 8; ++b) {
        if (e0 + b < total) dt[e0 + b] = dv[b];
      }
    }
  }
  // Block reduction (any summation order is allowed), one atomicAdd per block.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    float v = lane < (kThreads / 32) ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) atomicAdd(delta_sum, v);
  }
}

// Checks the residual buffers against the element count; returns planes.
ffi::Error CheckResidual(const char* op, ffi::AnyBuffer nibbles, ffi::AnyBuffer flags,
                         int64_t total, int32_t qn, int32_t qp, int* planes) {
  if (qn < 0 || qn > 8 || qp < 0 || qp > 7) {
    return InvalidArgument(std::string(op) + ": need 0 <= qn <= 8, 0 <= qp <= 7");
  }
  if (nibbles.element_type() != ffi::DataType::U8 ||
      flags.element_type() != ffi::DataType::U8) {
    return InvalidArgument(std::string(op) + ": nibbles and flags must be uint8");
  }
  *planes = qn <= 7 ? 1 : 2;
  if (static_cast<int64_t>(nibbles.element_count()) != CeilDiv(total, 2)) {
    return InvalidArgument(std::string(op) + ": nibbles must have ceil(M*K/2) bytes");
  }
  auto fd = flags.dimensions();
  if (fd.size() != 2 || fd[0] != *planes || fd[1] != CeilDiv(total, 8)) {
    return InvalidArgument(std::string(op) + ": flags must be u8[F, ceil(M*K/8)]");
  }
  return ffi::Error::Success();
}

unsigned GridFor(int64_t groups) {
  int64_t blocks = CeilDiv(groups, kThreads);
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

ffi::Error ResidualValuesImpl(cudaStream_t stream, ffi::AnyBuffer nibbles,
                              ffi::AnyBuffer flags, ffi::Result<ffi::AnyBuffer> q,
                              int32_t qn, int32_t qp) {
  if (q->element_type() != ffi::DataType::S8) {
    return InvalidArgument("residual_values: q must be int8");
  }
  const int64_t total = static_cast<int64_t>(q->element_count());
  int planes = 1;
  ffi::Error err = CheckResidual("residual_values", nibbles, flags, total, qn, qp, &planes);
  if (err.failure()) return err;
  if (total == 0) return ffi::Error::Success();
  const bool vec = IsAligned(nibbles.untyped_data(), 4) && IsAligned(q->untyped_data(), 8);
  ResidualValuesKernel<<<GridFor(CeilDiv(total, 8)), kThreads, 0, stream>>>(
      reinterpret_cast<const uint8_t*>(nibbles.untyped_data()),
      reinterpret_cast<const uint8_t*>(flags.untyped_data()), CeilDiv(total, 8),
      planes, total, qn, qp, vec, reinterpret_cast<int8_t*>(q->untyped_data()));
  return CheckLaunch("residual_values kernel launch");
}

ffi::Error LsqBackwardImpl(cudaStream_t stream, ffi::AnyBuffer grad,
                           ffi::AnyBuffer nibbles, ffi::AnyBuffer flags,
                           ffi::Result<ffi::AnyBuffer> dt,
                           ffi::Result<ffi::AnyBuffer> delta_sum, int32_t qn,
                           int32_t qp) {
  if (grad.element_type() != ffi::DataType::F32 ||
      dt->element_type() != ffi::DataType::F32 ||
      delta_sum->element_type() != ffi::DataType::F32) {
    return InvalidArgument("lsq_backward: grad, dt and delta_sum must be float32");
  }
  const int64_t total = static_cast<int64_t>(grad.element_count());
  if (static_cast<int64_t>(dt->element_count()) != total || delta_sum->element_count() != 1) {
    return InvalidArgument("lsq_backward: dt must have grad's shape, delta_sum is a scalar");
  }
  int planes = 1;
  ffi::Error err = CheckResidual("lsq_backward", nibbles, flags, total, qn, qp, &planes);
  if (err.failure()) return err;
  float* sum = reinterpret_cast<float*>(delta_sum->untyped_data());
  err = CheckCuda("lsq_backward memset", cudaMemsetAsync(sum, 0, sizeof(float), stream));
  if (err.failure()) return err;
  if (total == 0) return ffi::Error::Success();
  const bool vec = IsAligned(nibbles.untyped_data(), 4) &&
                   IsAligned(grad.untyped_data(), 16) && IsAligned(dt->untyped_data(), 16);
  LsqBackwardKernel<<<GridFor(CeilDiv(total, 8)), kThreads, 0, stream>>>(
      reinterpret_cast<const float*>(grad.untyped_data()),
      reinterpret_cast<const uint8_t*>(nibbles.untyped_data()),
      reinterpret_cast<const uint8_t*>(flags.untyped_data()), CeilDiv(total, 8),
      planes, total, qn, qp, vec, reinterpret_cast<float*>(dt->untyped_data()), sum);
  return CheckLaunch("lsq_backward kernel launch");
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_residual_values, jint4::cuda::ResidualValuesImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()     // nibbles u8[P]
        .Arg<xla::ffi::AnyBuffer>()     // flags u8[F, Q]
        .Ret<xla::ffi::AnyBuffer>()     // q s8[M, K]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_lsq_backward, jint4::cuda::LsqBackwardImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()     // grad f32[M, K]
        .Arg<xla::ffi::AnyBuffer>()     // nibbles u8[P]
        .Arg<xla::ffi::AnyBuffer>()     // flags u8[F, Q]
        .Ret<xla::ffi::AnyBuffer>()     // dt f32[M, K]
        .Ret<xla::ffi::AnyBuffer>()     // delta_sum f32[]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp"));
