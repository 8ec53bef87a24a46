// jint4_lsq_backward (CUDA): LSQ's elementwise backward of an activation from
// its packed residual (residual_decode.cuh), then the block Hadamard.
// Chunks of 2048 elements of dT[M, K]; each element gathers its gradient
// (the kept-row slots), applies the STE mask and adds its delta term, then
// the chunk runs the block +-1 Hadamard on it times Pow2(-L), is scaled by
// HadamardScale(L), then Pow2(L) (the float contract of jint4_math.h: the +-1
// sums never overflow) and stored in dT's dtype. Full chunks with K % 8 == 0 and aligned pointers:
// LsqBackwardChunksKernel (two chunks per block, every load issued first,
// Hadamard in registers / warp shuffles: ChunkHadamard8); the rest (partial
// last chunk, ragged or misaligned): LsqBackwardKernel, through shared
// memory (the same Butterfly calls on the same values).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/jint4_math.h"
#include "cuda_common.h"
#include "cuda_ffi.h"
#include "device_util.cuh"
#include "handlers.h"
#include "residual_decode.cuh"

namespace jint4 {
namespace cuda {
namespace {

constexpr int kThreads = 256;

constexpr int kChunk = 2048;  // multiple of the largest Hadamard block (1024)
constexpr int kChunksPerBlock = 2;

// Full chunks, vec (K % 8 == 0, grad and dt 16-byte aligned, nibbles 4-byte
// aligned): block b runs chunks kChunksPerBlock * b .. +1 (those below
// full_chunks); thread t holds elements 8t .. 8t+7 of each (one row, so one
// slot pair; one flag byte per plane, four nibble bytes). All of a thread's
// loads (slots, then the gradient rows, nibbles and flags of both chunks)
// are issued before any decoding; then per chunk: gather sum, STE mask and
// delta term, ChunkHadamard8 (registers / warp shuffles), 16-byte stores.
template <typename G, typename OutT, bool kGather>
__global__ void __launch_bounds__(kThreads)
LsqBackwardChunksKernel(const G* __restrict__ grad,
                        const int32_t* __restrict__ slots, int64_t M, int64_t K,
                        int64_t full_chunks, const uint8_t* __restrict__ nibbles,
                        const uint8_t* __restrict__ flags, int64_t plane_stride,
                        int planes, int qn, int qp, const int32_t* __restrict__ log2_ptr,
                        int max_log2, OutT* __restrict__ dt,
                        float* __restrict__ delta_sum) {
  __shared__ __align__(16) float sx[kChunk];
  static_assert(kChunk == 8 * kThreads, "8 elements per thread");
  constexpr int U = kChunksPerBlock;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * U;
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float scale = HadamardScale(L);
  const float down = Pow2(-L), up = Pow2(L);  // the float contract
  bool live[U];
  int64_t e0[U];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    live[j] = first + j < full_chunks;  // uniform across the block
    e0[j] = (first + j) * kChunk + 8 * threadIdx.x;
  }
  float g[U][8];
  if (kGather) {
    int32_t s0[U], s1[U];
    int64_t k[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      s0[j] = -1;
      s1[j] = -1;
      k[j] = 0;
      if (live[j]) {
        const int64_t t = e0[j] / K;
        k[j] = e0[j] - t * K;
        s0[j] = slots[t];
        s1[j] = slots[M + t];
      }
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = b[i] = 0.0f;
      if (s0[j] >= 0) Load8(grad + static_cast<int64_t>(s0[j]) * K + k[j], a);
      if (s1[j] >= 0) Load8(grad + static_cast<int64_t>(s1[j]) * K + k[j], b);
#pragma unroll
      for (int i = 0; i < 8; ++i) g[j][i] = a[i] + b[i];
    }
  } else {
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (live[j]) {
        Load8(grad + e0[j], g[j]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) g[j][i] = 0.0f;
      }
    }
  }
  uint32_t nib[U], f0[U], f1[U];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    nib[j] = 0u;
    f0[j] = 0u;
    f1[j] = 0u;
    if (live[j]) LoadGroup(nibbles, flags, plane_stride, planes, e0[j], &nib[j], &f0[j], &f1[j]);
  }
  float acc = 0.0f;
  const float qp_f = static_cast<float>(qp), qn_f = -static_cast<float>(qn);
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (!live[j]) continue;  // uniform: ChunkHadamard8's barriers are safe
    float v[8];
    if (qn <= 7) {  // uniform
      // DecodeBackwardState from two bit tests per element: clipped (the STE
      // mask's zero, ClipTops) and bit0; delta_hat = clipped ? (bit0 ? qp :
      // -qn) : bit0 - 0.5.
      const uint32_t tops = ClipTops(nib[j]);
      DecodeMaskDelta<0>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<1>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<2>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<3>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<4>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<5>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<6>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
      DecodeMaskDelta<7>(tops, f0[j], qp_f, qn_f, g[j], v, &acc);
    } else {  // two flag planes (qn == 8)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int8_t code = NibbleToInt(static_cast<uint8_t>((nib[j] >> (4 * i)) & 0xFu));
        const uint8_t fl =
            static_cast<uint8_t>(((f0[j] >> i) & 1u) | (((f1[j] >> i) & 1u) << 1));
        int8_t qv;
        bool inside;
        float dh;
        DecodeBackwardState(code, fl, qn, qp, &qv, &inside, &dh);
        acc = acc + g[j][i] * dh;
        v[i] = inside ? g[j][i] : 0.0f;
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] *= down;
    ChunkHadamard8<kThreads>(v, L, sx);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = (v[i] * scale) * up;
    Store8(dt + e0[j], v);
  }
  BlockSumToGlobal<kThreads>(acc, delta_sum);  // any summation order is allowed
}

// General path (the partial last chunk, or ragged / misaligned operands): one
// chunk per block, chunk first_chunk + blockIdx.x; element i of the chunk
// per thread i, i + kThreads, ...: gather, STE mask and delta term into
// shared memory, BlockHadamardSmem, store.
template <typename G, typename OutT>
__global__ void __launch_bounds__(kThreads)
LsqBackwardKernel(const G* __restrict__ grad, int64_t S,
                  const int32_t* __restrict__ slots, int64_t M, int64_t K,
                  const uint8_t* __restrict__ nibbles,
                  const uint8_t* __restrict__ flags, int64_t plane_stride,
                  int planes, int qn, int qp, const int32_t* __restrict__ log2_ptr,
                  int max_log2, int64_t first_chunk, OutT* __restrict__ dt,
                  float* __restrict__ delta_sum) {
  __shared__ __align__(16) float sx[kChunk];
  const int64_t total = M * K;
  const int64_t start = (first_chunk + blockIdx.x) * kChunk;
  const int len = static_cast<int>(total - start < kChunk ? total - start : kChunk);
  const int L = ClampedLog2(log2_ptr, max_log2);
  const float down = Pow2(-L), up = Pow2(L);  // the float contract
  float acc = 0.0f;
  // Element e = start + i of row t, column k; i advances by kThreads.
  int64_t t = (start + threadIdx.x) / K;
  int64_t k = (start + threadIdx.x) - t * K;
  for (int i = threadIdx.x; i < len; i += kThreads) {
    float g;
    if (slots != nullptr) {
      const int32_t s0 = slots[t];
      const int32_t s1 = slots[M + t];
      const float a = s0 >= 0 ? ToFloat(grad[static_cast<int64_t>(s0) * K + k]) : 0.0f;
      const float b = s1 >= 0 ? ToFloat(grad[static_cast<int64_t>(s1) * K + k]) : 0.0f;
      g = a + b;
    } else {
      g = ToFloat(grad[start + i]);
    }
    int8_t qv;
    bool inside;
    float dh;
    DecodeAt(nibbles, flags, plane_stride, planes, start + i, qn, qp, &qv, &inside, &dh);
    acc = acc + g * dh;
    sx[i] = (inside ? g : 0.0f) * down;
    k += kThreads;
    while (k >= K) {
      k -= K;
      ++t;
    }
  }
  BlockHadamardSmem<kThreads>(sx, len, L);
  const float scale = HadamardScale(L);
  for (int i = threadIdx.x; i < len; i += kThreads) {
    dt[start + i] = FromFloat<OutT>((sx[i] * scale) * up);
  }

  BlockSumToGlobal<kThreads>(acc, delta_sum);  // any summation order is allowed
}

ffi::Error LsqBackwardImpl(cudaStream_t stream, ffi::AnyBuffer grad,
                           ffi::AnyBuffer nibbles, ffi::AnyBuffer flags,
                           ffi::AnyBuffer slots, ffi::AnyBuffer log2_block,
                           ffi::Result<ffi::AnyBuffer> dt,
                           ffi::Result<ffi::AnyBuffer> delta_sum, int32_t qn,
                           int32_t qp, int32_t gather) {
  const FloatKind out_kind = KindOf(dt->element_type());
  const FloatKind grad_kind = KindOf(grad.element_type());
  if (grad_kind == FloatKind::kInvalid || out_kind == FloatKind::kInvalid ||
      slots.element_type() != ffi::DataType::S32 ||
      log2_block.element_type() != ffi::DataType::S32 ||
      delta_sum->element_type() != ffi::DataType::F32) {
    return InvalidArgument("lsq_backward: grad f32/bf16/f16, slots s32, log2_block s32, dt f32/bf16/f16,"
                           " delta_sum f32");
  }
  auto gd = grad.dimensions();
  auto dd = dt->dimensions();
  auto sd = slots.dimensions();
  if (gd.size() != 2 || dd.size() != 2 || sd.size() != 2 || sd[0] != 2 ||
      delta_sum->element_count() != 1 || log2_block.element_count() != 1) {
    return InvalidArgument("lsq_backward: grad[S, K], slots[2, M], dt[M, K], scalars");
  }
  const int64_t S = gd[0], K = gd[1], M = dd[0];
  if (dd[1] != K || (gather ? sd[1] != M : (sd[1] != 0 || S != M))) {
    return InvalidArgument("lsq_backward: dt must be [M, K] with slots [2, M] (gather) or"
                           " grad's shape (no gather)");
  }
  int planes = 1;
  ffi::Error err = CheckResidual("lsq_backward", nibbles, flags, M * K, qn, qp, &planes);
  if (err.failure()) return err;
  float* sum = reinterpret_cast<float*>(delta_sum->untyped_data());
  err = CheckCuda("lsq_backward memset", cudaMemsetAsync(sum, 0, sizeof(float), stream));
  if (err.failure()) return err;
  if (M * K == 0) return ffi::Error::Success();
  const int64_t chunks = CeilDiv(M * K, kChunk);
  if (chunks > 0x7FFFFFFF) return InvalidArgument("lsq_backward: too large");
  // Full chunks with whole, aligned groups of 8: the register kernel; the
  // rest (the partial last chunk, or everything otherwise): the general one.
  const bool vec = K % 8 == 0 && IsAligned(grad.untyped_data(), 16) &&
                   IsAligned(dt->untyped_data(), 16) && IsAligned(nibbles.untyped_data(), 4);
  const int64_t full = vec ? (M * K) / kChunk : 0;
  const int32_t* slots_p = gather ? reinterpret_cast<const int32_t*>(slots.untyped_data()) : nullptr;
  const uint8_t* nib_p = reinterpret_cast<const uint8_t*>(nibbles.untyped_data());
  const uint8_t* flag_p = reinterpret_cast<const uint8_t*>(flags.untyped_data());
  const int32_t* log2_p = reinterpret_cast<const int32_t*>(log2_block.untyped_data());
  const int64_t Q = CeilDiv(M * K, 8);
  const int max_log2 = MaxLog2Block(K);
  DispatchFloat(grad_kind, [&](auto gtag) {
    using G = decltype(gtag);
    const G* grad_p = reinterpret_cast<const G*>(grad.untyped_data());
    DispatchFloat(out_kind, [&](auto tag) {
      using OutT = decltype(tag);
      OutT* dt_p = reinterpret_cast<OutT*>(dt->untyped_data());
      if (full > 0) {
        const unsigned fb = static_cast<unsigned>(CeilDiv(full, kChunksPerBlock));
        if (gather) {
          LsqBackwardChunksKernel<G, OutT, true><<<fb, kThreads, 0, stream>>>(
              grad_p, slots_p, M, K, full, nib_p, flag_p, Q, planes, qn, qp, log2_p, max_log2,
              dt_p, sum);
        } else {
          LsqBackwardChunksKernel<G, OutT, false><<<fb, kThreads, 0, stream>>>(
              grad_p, slots_p, M, K, full, nib_p, flag_p, Q, planes, qn, qp, log2_p, max_log2,
              dt_p, sum);
        }
      }
      if (chunks > full) {
        LsqBackwardKernel<G, OutT><<<static_cast<unsigned>(chunks - full), kThreads, 0, stream>>>(
            grad_p, S, slots_p, M, K, nib_p, flag_p, Q, planes, qn, qp, log2_p, max_log2, full,
            dt_p, sum);
      }
    });
  });
  return CheckLaunch("lsq_backward kernel launch");
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_lsq_backward, jint4::cuda::LsqBackwardImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()     // grad f32 | bf16 | f16 [S, K]
        .Arg<xla::ffi::AnyBuffer>()     // nibbles u8[P]
        .Arg<xla::ffi::AnyBuffer>()     // flags u8[F, Q]
        .Arg<xla::ffi::AnyBuffer>()     // slots s32[2, M] or [2, 0]
        .Arg<xla::ffi::AnyBuffer>()     // log2_block s32[]
        .Ret<xla::ffi::AnyBuffer>()     // dt f32 | bf16 | f16 [M, K]
        .Ret<xla::ffi::AnyBuffer>()     // delta_sum f32[]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp")
        .Attr<int32_t>("gather"));
