// jint4_hadamard_quantize (CUDA): fused block-diagonal Hadamard + LSQ
// quantize + packed backward residual, one thread block per chunk of
// kHqChunk = 2048 consecutive elements of the row-major x[M, K]. Full,
// aligned chunks run in registers (HadamardQuantizeFullChunk: stages 0-7 in
// registers and warp shuffles, 8-10 through one shared-memory pass); the
// partial last chunk (and odd alignments) through shared memory.
//
// Why flat chunks work: the Hadamard block 2^L divides K (L is clamped to the
// largest such power, <= 10), so every flat index that is a multiple of 2^L
// starts a Hadamard block of some row; a chunk starts at a multiple of kChunk
// (a multiple of 1024 >= 2^L) and holds whole blocks, also the last, partial
// one (M*K is a multiple of 2^L). The butterfly pairs of HadamardInPlace never
// cross a chunk, and each pair is the same float operation in any order, so
// the result is bit-identical to the reference (both paths make the same
// Butterfly calls on the same values). A chunk also starts at a
// multiple of 8, so it owns whole nibble bytes and flag bytes; only the last
// chunk has padding, which is exactly the README's zero padding.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/jint4_math.h"
#include "cuda_common.h"
#include "cuda_ffi.h"
#include "handlers.h"

namespace jint4 {
namespace cuda {
namespace {

constexpr int kHqThreads = 256;
constexpr int kHqChunk = 2048;  // multiple of 1024 (largest block) and of 8
static_assert(kHqChunk % 1024 == 0 && kHqChunk % 8 == 0, "chunk size");
static_assert(kHqChunk == 8 * kHqThreads, "register path: 8 elements per thread");

// Butterfly stages s .. s+R-1 over the chunk in shared memory. A block of
// 2^R * h elements (h = 2^s) splits into h groups of 2^R elements at stride
// h, {i0 + k h}; every pair of these R stages (distance h 2^d, d < R) lies in
// one group, so each thread loads a group into registers and applies stage s
// (d = 0) to all its pairs, then stage s+1, ...: the same Butterfly calls on
// the same values as HadamardInPlace, in an order that only permutes
// independent pairs within a stage. len is a multiple of 2^(s+R).
template <int R>
__device__ __forceinline__ void ButterflyPass(float* sx, int len, int s, int tid) {
  constexpr int kN = 1 << R;
  const int h = 1 << s;
  const int groups = len >> R;
  for (int o = tid; o < groups; o += kHqThreads) {
    const int i0 = ((o >> s) << (s + R)) + (o & (h - 1));
    float v[kN];
#pragma unroll
    for (int k = 0; k < kN; ++k) v[k] = sx[i0 + k * h];
#pragma unroll
    for (int d = 0; d < R; ++d) {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if ((k & (1 << d)) == 0) Butterfly(v[k], v[k | (1 << d)]);
      }
    }
#pragma unroll
    for (int k = 0; k < kN; ++k) sx[i0 + k * h] = v[k];
  }
}

// One butterfly of a stage whose pairs sit in lanes `lane` and `lane ^ m` of
// a warp, element k of each: Butterfly(a, b) with a from the lower lane;
// the lower lane keeps the sum, the upper one the difference.
__device__ __forceinline__ float ShuffleButterfly(float mine, int lane, int m) {
  const float other = __shfl_xor_sync(0xffffffffu, mine, m);
  if ((lane & m) == 0) {
    float a = mine, b = other;
    Butterfly(a, b);
    return a;
  }
  float a = other, b = mine;
  Butterfly(a, b);
  return b;
}

// Fast path for a full, aligned chunk: thread t holds elements 8t .. 8t+7 of
// the chunk in registers. Stages 0-2 (pairs inside the thread), 3-7 (pairs in
// lanes t ^ 1 .. t ^ 16 of the warp: elements 8t+k and 8(t^m)+k are 8m apart)
// and, only when L > 8, stages 8-10 through one shared-memory pass; then the
// quantize and the packing of this thread's 8 elements: one 8-byte q store,
// one 4-byte nibble store, one flag byte per plane. The same Butterfly calls
// on the same values as the shared-memory path.
__device__ __forceinline__ void HadamardQuantizeFullChunk(
    const float* __restrict__ x, int64_t start, int L, float* sx, float step,
    uint32_t seed0, uint32_t seed1, int qn, int qp, int with_residual, int planes,
    int8_t* __restrict__ q, uint8_t* __restrict__ nibbles,
    uint8_t* __restrict__ flags, int64_t plane_stride) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const float4* x4 = reinterpret_cast<const float4*>(x + start) + 2 * tid;
  const float4 va = x4[0];
  const float4 vb = x4[1];
  float v[8] = {va.x, va.y, va.z, va.w, vb.x, vb.y, vb.z, vb.w};
#pragma unroll
  for (int d = 0; d < 3; ++d) {
    if (d < L) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if ((k & (1 << d)) == 0) Butterfly(v[k], v[k | (1 << d)]);
      }
    }
  }
#pragma unroll
  for (int d = 0; d < 5; ++d) {
    if (3 + d < L) {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = ShuffleButterfly(v[k], lane, 1 << d);
    }
  }
  if (L > 8) {  // uniform across the block
    float4* s4 = reinterpret_cast<float4*>(sx) + 2 * tid;
    s4[0] = make_float4(v[0], v[1], v[2], v[3]);
    s4[1] = make_float4(v[4], v[5], v[6], v[7]);
    __syncthreads();
    if (L - 8 == 2) {
      ButterflyPass<2>(sx, kHqChunk, 8, tid);
    } else {
      ButterflyPass<1>(sx, kHqChunk, 8, tid);
    }
    __syncthreads();
    const float4 ra = s4[0];
    const float4 rb = s4[1];
    v[0] = ra.x; v[1] = ra.y; v[2] = ra.z; v[3] = ra.w;
    v[4] = rb.x; v[5] = rb.y; v[6] = rb.z; v[7] = rb.w;
  }

  const int64_t e0 = start + 8 * tid;
  uint32_t qw[2] = {0u, 0u};
  uint32_t nib = 0, f0 = 0, f1 = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float vv = v[k] / step;
    const int8_t qv = QuantizeCode(vv, qn, qp);
    qw[k >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(qv)) << (8 * (k & 3));
    if (with_residual) {
      const float u = Uniform(seed0, seed1, static_cast<uint32_t>(e0 + k));
      int8_t code;
      uint8_t fl;
      EncodeBackwardState(vv, u, qn, qp, &code, &fl);
      nib |= (static_cast<uint32_t>(static_cast<uint8_t>(code)) & 0xFu) << (4 * k);
      f0 |= static_cast<uint32_t>(fl & 1) << k;
      f1 |= static_cast<uint32_t>((fl >> 1) & 1) << k;
    }
  }
  *reinterpret_cast<uint2*>(q + e0) = make_uint2(qw[0], qw[1]);
  if (with_residual) {
    *reinterpret_cast<uint32_t*>(nibbles + (e0 >> 1)) = nib;
    flags[e0 >> 3] = static_cast<uint8_t>(f0);
    if (planes == 2) flags[plane_stride + (e0 >> 3)] = static_cast<uint8_t>(f1);
  }
}

__global__ void __launch_bounds__(kHqThreads)
HadamardQuantizeKernel(const float* __restrict__ x, int64_t total,
                       const float* __restrict__ step_ptr,
                       const uint32_t* __restrict__ seed,
                       const int32_t* __restrict__ log2_ptr, int max_log2,
                       int qn, int qp, int with_residual, int planes,
                       int8_t* __restrict__ q, uint8_t* __restrict__ nibbles,
                       uint8_t* __restrict__ flags, int64_t plane_stride) {
  __shared__ __align__(16) float sx[kHqChunk];
  __shared__ int8_t scode[kHqChunk];
  __shared__ uint8_t sflag[kHqChunk];

  const int64_t start = static_cast<int64_t>(blockIdx.x) * kHqChunk;
  const int64_t rest = total - start;
  const int len = static_cast<int>(rest < kHqChunk ? rest : kHqChunk);
  const int tid = threadIdx.x;

  int L = *log2_ptr;
  L = L < 0 ? 0 : (L > max_log2 ? max_log2 : L);
  const float step = *step_ptr;
  const uint32_t seed0 = seed[0];
  const uint32_t seed1 = seed[1];

  // Full chunk with aligned pointers (start is a multiple of kHqChunk): the
  // register path. Only the last chunk can be partial; the condition is
  // uniform across the block.
  if (len == kHqChunk && (reinterpret_cast<uintptr_t>(x) & 15) == 0 &&
      (reinterpret_cast<uintptr_t>(q) & 7) == 0 &&
      (!with_residual || (reinterpret_cast<uintptr_t>(nibbles) & 3) == 0)) {
    HadamardQuantizeFullChunk(x, start, L, sx, step, seed0, seed1, qn, qp,
                              with_residual, planes, q, nibbles, flags, plane_stride);
    return;
  }

  // General path through shared memory (partial last chunk, odd alignment).
  if (len == kHqChunk && (reinterpret_cast<uintptr_t>(x) & 15) == 0) {
    // Full chunk, 16-byte aligned (start is a multiple of kHqChunk): all of
    // this thread's float4 loads in flight before the first shared store.
    constexpr int kVec = kHqChunk / 4 / kHqThreads;
    const float4* x4 = reinterpret_cast<const float4*>(x + start);
    float4 v[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = x4[tid + j * kHqThreads];
#pragma unroll
    for (int j = 0; j < kVec; ++j) reinterpret_cast<float4*>(sx)[tid + j * kHqThreads] = v[j];
  } else {
    for (int i = tid; i < len; i += kHqThreads) sx[i] = x[start + i];
  }

  // Butterfly stages 0 .. L-1 (HadamardInPlace), up to three per pass over
  // shared memory (one barrier per pass).
  for (int s = 0; s < L;) {
    const int r = L - s < 3 ? L - s : 3;
    __syncthreads();
    if (r == 3) {
      ButterflyPass<3>(sx, len, s, tid);
    } else if (r == 2) {
      ButterflyPass<2>(sx, len, s, tid);
    } else {
      ButterflyPass<1>(sx, len, s, tid);
    }
    s += r;
  }
  __syncthreads();

  // Groups of 4 consecutive elements per thread: one 4-byte store of q.
  const bool q_aligned = (reinterpret_cast<uintptr_t>(q) & 3) == 0;
  for (int i0 = tid * 4; i0 < len; i0 += kHqThreads * 4) {
    const int n = len - i0 < 4 ? len - i0 : 4;
    float xv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (n == 4) {
      const float4 t = reinterpret_cast<const float4*>(sx)[i0 >> 2];
      xv[0] = t.x;
      xv[1] = t.y;
      xv[2] = t.z;
      xv[3] = t.w;
    } else {
      for (int k = 0; k < n; ++k) xv[k] = sx[i0 + k];
    }
    uint32_t packed = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < n) {
        const int i = i0 + k;
        const float v = xv[k] / step;
        const int8_t qv = QuantizeCode(v, qn, qp);
        packed |= static_cast<uint32_t>(static_cast<uint8_t>(qv)) << (8 * k);
        if (with_residual) {
          const float u = Uniform(seed0, seed1, static_cast<uint32_t>(start + i));
          int8_t code;
          uint8_t fl;
          EncodeBackwardState(v, u, qn, qp, &code, &fl);
          scode[i] = code;
          sflag[i] = fl;
        }
      }
    }
    if (n == 4 && q_aligned) {
      // start + i0 is a multiple of 4
      *reinterpret_cast<uint32_t*>(q + start + i0) = packed;
    } else {
      for (int k = 0; k < n; ++k) q[start + i0 + k] = static_cast<int8_t>((packed >> (8 * k)) & 0xFF);
    }
  }
  if (!with_residual) return;  // uniform across the block

  const int len8 = (len + 7) & ~7;  // <= kHqChunk
  for (int i = len + tid; i < len8; i += kHqThreads) {
    scode[i] = 0;  // padding bits are 0
    sflag[i] = 0;
  }
  __syncthreads();

  const int groups = len8 >> 3;
  const bool nib_aligned = (reinterpret_cast<uintptr_t>(nibbles) & 3) == 0;
  for (int g = tid; g < groups; g += kHqThreads) {
    const int e = g << 3;
    const int64_t nib0 = (start + e) >> 1;  // start + e is a multiple of 8
    uint32_t nib = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t lo = static_cast<uint32_t>(static_cast<uint8_t>(scode[e + 2 * k])) & 0xFu;
      const uint32_t hi = static_cast<uint32_t>(static_cast<uint8_t>(scode[e + 2 * k + 1])) & 0xFu;
      nib |= (lo | (hi << 4)) << (8 * k);
    }
    if (e + 8 <= len && nib_aligned) {
      *reinterpret_cast<uint32_t*>(nibbles + nib0) = nib;  // nib0 % 4 == 0
    } else {
      for (int k = 0; k < 4; ++k) {
        if (e + 2 * k < len) nibbles[nib0 + k] = static_cast<uint8_t>((nib >> (8 * k)) & 0xFF);
      }
    }
    uint32_t f0 = 0, f1 = 0;
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      f0 |= static_cast<uint32_t>(sflag[e + b] & 1) << b;
      f1 |= static_cast<uint32_t>((sflag[e + b] >> 1) & 1) << b;
    }
    const int64_t fb = (start + e) >> 3;
    flags[fb] = static_cast<uint8_t>(f0);
    if (planes == 2) flags[plane_stride + fb] = static_cast<uint8_t>(f1);
  }
}

// Largest k <= 10 with 2^k dividing size (hadamard.py `max_log2_block`).
int MaxLog2Block(int64_t size) {
  int k = 0;
  while (k < 10 && size % (int64_t{2} << k) == 0) ++k;
  return k;
}

ffi::Error HadamardQuantizeImpl(cudaStream_t stream, ffi::AnyBuffer x,
                                ffi::AnyBuffer step, ffi::AnyBuffer seed,
                                ffi::AnyBuffer log2_block,
                                ffi::Result<ffi::AnyBuffer> q,
                                ffi::Result<ffi::AnyBuffer> nibbles,
                                ffi::Result<ffi::AnyBuffer> flags, int32_t qn,
                                int32_t qp, int32_t with_residual) {
  if (x.element_type() != ffi::DataType::F32 ||
      step.element_type() != ffi::DataType::F32 ||
      seed.element_type() != ffi::DataType::U32 ||
      log2_block.element_type() != ffi::DataType::S32 ||
      q->element_type() != ffi::DataType::S8 ||
      nibbles->element_type() != ffi::DataType::U8 ||
      flags->element_type() != ffi::DataType::U8) {
    return InvalidArgument("hadamard_quantize: wrong dtypes");
  }
  if (qn < 0 || qn > 8 || qp < 0 || qp > 7) {
    return InvalidArgument("hadamard_quantize: need 0 <= qn <= 8, 0 <= qp <= 7");
  }
  auto dims = x.dimensions();
  if (dims.size() < 1) return InvalidArgument("hadamard_quantize: x must be [M, K]");
  const int64_t K = dims[dims.size() - 1];
  const int64_t total = static_cast<int64_t>(x.element_count());
  if (static_cast<int64_t>(q->element_count()) != total) {
    return InvalidArgument("hadamard_quantize: q must have x's shape");
  }
  if (step.element_count() < 1 || seed.element_count() < 2 ||
      log2_block.element_count() < 1) {
    return InvalidArgument("hadamard_quantize: step, seed[2], log2_block required");
  }
  const int planes = qn <= 7 ? 1 : 2;
  const int64_t P = with_residual ? CeilDiv(total, 2) : 0;
  const int64_t Q = with_residual ? CeilDiv(total, 8) : 0;
  if (static_cast<int64_t>(nibbles->element_count()) != P) {
    return InvalidArgument("hadamard_quantize: nibbles must have ceil(M*K/2) bytes");
  }
  if (with_residual) {
    auto fd = flags->dimensions();
    if (fd.size() != 2 || fd[0] != planes || fd[1] != Q) {
      return InvalidArgument("hadamard_quantize: flags must be u8[F, ceil(M*K/8)]");
    }
  } else if (flags->element_count() != 0) {
    return InvalidArgument("hadamard_quantize: flags must be empty without residual");
  }
  if (total == 0) return ffi::Error::Success();

  const int max_log2 = K > 0 ? MaxLog2Block(K) : 0;
  const int64_t blocks = CeilDiv(total, kHqChunk);
  if (blocks > 0x7FFFFFFF) return InvalidArgument("hadamard_quantize: too large");
  HadamardQuantizeKernel<<<static_cast<unsigned>(blocks), kHqThreads, 0, stream>>>(
      reinterpret_cast<const float*>(x.untyped_data()), total,
      reinterpret_cast<const float*>(step.untyped_data()),
      reinterpret_cast<const uint32_t*>(seed.untyped_data()),
      reinterpret_cast<const int32_t*>(log2_block.untyped_data()), max_log2, qn,
      qp, with_residual ? 1 : 0, planes,
      reinterpret_cast<int8_t*>(q->untyped_data()),
      reinterpret_cast<uint8_t*>(nibbles->untyped_data()),
      reinterpret_cast<uint8_t*>(flags->untyped_data()), Q);
  return CheckLaunch("hadamard_quantize kernel launch");
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_hadamard_quantize, jint4::cuda::HadamardQuantizeImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Arg<xla::ffi::AnyBuffer>()     // x f32[M, K]
        .Arg<xla::ffi::AnyBuffer>()     // step f32[]
        .Arg<xla::ffi::AnyBuffer>()     // seed u32[2]
        .Arg<xla::ffi::AnyBuffer>()     // log2_block s32[]
        .Ret<xla::ffi::AnyBuffer>()     // q s8[M, K]
        .Ret<xla::ffi::AnyBuffer>()     // nibbles u8[P]
        .Ret<xla::ffi::AnyBuffer>()     // flags u8[F, Q]
        .Attr<int32_t>("qn")
        .Attr<int32_t>("qp")
        .Attr<int32_t>("with_residual"));
