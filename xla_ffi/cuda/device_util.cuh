// Device helpers shared by jint4's elementwise CUDA kernels: float loads and
// stores of the three float dtypes, warp reductions, and the block Hadamard
// transform over a chunk in shared memory.
#ifndef JINT4_XLA_FFI_CUDA_DEVICE_UTIL_CUH_
#define JINT4_XLA_FFI_CUDA_DEVICE_UTIL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/jint4_math.h"
#include "cuda_ffi.h"

namespace jint4 {
namespace cuda {

// Float dtypes the handlers read and write (exact widening on load,
// round-to-nearest-even on store, as jnp's astype).
enum class FloatKind { kF32, kBF16, kF16, kInvalid };

inline FloatKind KindOf(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return FloatKind::kF32;
    case ffi::DataType::BF16: return FloatKind::kBF16;
    case ffi::DataType::F16: return FloatKind::kF16;
    default: return FloatKind::kInvalid;
  }
}

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }

// Calls f.template operator()<T>() with T the C++ type of `kind`.
template <typename F>
__host__ __forceinline__ void DispatchFloat(FloatKind kind, F&& f) {
  switch (kind) {
    case FloatKind::kF32: f(float{}); break;
    case FloatKind::kBF16: f(__nv_bfloat16{}); break;
    case FloatKind::kF16: f(__half{}); break;
    default: break;
  }
}

__host__ __device__ __forceinline__ int64_t CeilDivDev(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Eight consecutive elements as float: p 16-byte aligned (f32: two float4,
// 16-bit types: one 16-byte load).
__device__ __forceinline__ void Load8(const float* p, float* v) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void Load8(const T* p, float* v) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = ToFloat(h[k]);
}

// Stores eight floats, converted to T, at a 16-byte aligned p.
__device__ __forceinline__ void Store8(float* p, const float* v) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T>
__device__ __forceinline__ void Store8(T* p, const float* v) {
  uint4 raw;
  T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < 8; ++k) h[k] = FromFloat<T>(v[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// The low bytes of a, b, c, d as one word (a in byte 0): three byte
// permutes. Codes computed as shifted floats (QuantizeEncode, SplitBits)
// carry their int8 value in the low byte.
__device__ __forceinline__ uint32_t PackLowBytes4(uint32_t a, uint32_t b, uint32_t c,
                                                  uint32_t d) {
  return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}

// Eight low bytes (element k at byte k) as two words.
__device__ __forceinline__ uint2 PackLowBytes8(const uint32_t* b) {
  return make_uint2(PackLowBytes4(b[0], b[1], b[2], b[3]), PackLowBytes4(b[4], b[5], b[6], b[7]));
}

// u[k] = Uniform(seed, e32 + k) for k < 8 (flat index mod 2^32), e32 even:
// one PairHash per two elements.
__device__ __forceinline__ void Uniform8(uint32_t seed0, uint32_t seed1, uint32_t e32,
                                         float* u) {
#pragma unroll
  for (int k = 0; k < 8; k += 2) {
    UniformPair(seed0, seed1, (e32 + static_cast<uint32_t>(k)) >> 1, &u[k], &u[k + 1]);
  }
}

__device__ __forceinline__ int WarpSumInt(int v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float WarpSumFloat(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide sum of v added to *out (one atomicAdd per block).
template <int kThreads>
__device__ __forceinline__ void BlockSumToGlobal(float v, float* out) {
  __shared__ float warp_sums[kThreads / 32];
  v = WarpSumFloat(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < (kThreads / 32) ? warp_sums[lane] : 0.0f;
    w = WarpSumFloat(w);
    if (lane == 0) atomicAdd(out, w);
  }
}

__device__ __forceinline__ uint32_t WarpMaxBits(uint32_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const uint32_t o = __shfl_down_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Block-wide max of |v| as float bits into *max_bits (atomicMax). |v| with the
// sign bit cleared orders like its value as uint32, and every NaN pattern is
// above +Inf, so the max is max|v|, or a NaN if any v is NaN.
template <int kThreads>
__device__ __forceinline__ void BlockAbsMaxToGlobal(uint32_t bits,
                                                    unsigned int* max_bits) {
  __shared__ uint32_t warp_max[kThreads / 32];
  bits = WarpMaxBits(bits);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = bits;
  __syncthreads();
  if (warp == 0) {
    uint32_t v = lane < (kThreads / 32) ? warp_max[lane] : 0u;
    v = WarpMaxBits(v);
    if (lane == 0) atomicMax(max_bits, v);
  }
}

__device__ __forceinline__ uint32_t AbsBits(float v) {
  return __float_as_uint(v) & 0x7FFFFFFFu;
}

// Butterfly stages s .. s+R-1 over `len` floats in shared memory (len a
// multiple of 2^(s+R)). A block of 2^R * h elements (h = 2^s) splits into h
// groups of 2^R elements at stride h; each thread loads a group into
// registers and applies stage s, s+1, ... to its pairs: the same Butterfly
// calls on the same values as HadamardInPlace, in an order that only permutes
// independent pairs within a stage (bit-identical).
//
// pad_log2: element f of the chunk lives at sx[Padded(f)] = sx[f + (f >>
// pad_log2)], one pad float after every 2^pad_log2 elements (column tiles
// use it to avoid shared-memory bank conflicts; 30 = no padding). Blocks never
// straddle a pad (2^L <= 2^pad_log2).
__device__ __forceinline__ int Padded(int f, int pad_log2) { return f + (f >> pad_log2); }

template <int R, int kThreads>
__device__ __forceinline__ void ButterflyPass(float* sx, int len, int s, int pad_log2) {
  constexpr int kN = 1 << R;
  const int h = 1 << s;
  const int groups = len >> R;
  for (int o = threadIdx.x; o < groups; o += kThreads) {
    const int i0 = ((o >> s) << (s + R)) + (o & (h - 1));
    float v[kN];
#pragma unroll
    for (int k = 0; k < kN; ++k) v[k] = sx[Padded(i0 + k * h, pad_log2)];
#pragma unroll
    for (int d = 0; d < R; ++d) {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if ((k & (1 << d)) == 0) Butterfly(v[k], v[k | (1 << d)]);
      }
    }
#pragma unroll
    for (int k = 0; k < kN; ++k) sx[Padded(i0 + k * h, pad_log2)] = v[k];
  }
}

// HadamardInPlace on every aligned block of 2^L floats of sx[0, len): stages
// 0 .. L-1, up to three per pass (one barrier per pass). Starts and ends with
// __syncthreads(), so sx may be written just before and read just after.
template <int kThreads>
__device__ __forceinline__ void BlockHadamardSmem(float* sx, int len, int L,
                                                  int pad_log2 = 30) {
  for (int s = 0; s < L;) {
    const int r = L - s < 3 ? L - s : 3;
    __syncthreads();
    if (r == 3) {
      ButterflyPass<3, kThreads>(sx, len, s, pad_log2);
    } else if (r == 2) {
      ButterflyPass<2, kThreads>(sx, len, s, pad_log2);
    } else {
      ButterflyPass<1, kThreads>(sx, len, s, pad_log2);
    }
    s += r;
  }
  __syncthreads();
}

// One butterfly of a stage whose pairs sit in lanes `lane` and `lane ^ m` of
// a warp, element k of each: Butterfly(a, b) with a from the lower lane;
// the lower lane keeps the sum a + b = fma(mine, 1, other), the upper one
// the difference a - b = fma(mine, -1, other): one FMA per element (one
// rounding of the exact sum, as the add; signed zeros agree under
// round-to-nearest), on the FMA pipe rather than an integer sign flip.
__device__ __forceinline__ float ShuffleButterfly(float mine, int lane, int m) {
  const float other = __shfl_xor_sync(0xffffffffu, mine, m);
  return __fmaf_rn(mine, (lane & m) ? -1.0f : 1.0f, other);
}

// HadamardInPlace (blocks of 2^L, L <= 10, 2^L <= 8 * kThreads) over a chunk
// of 8 * kThreads consecutive elements whose start is a multiple of 2^L;
// thread t holds elements 8t .. 8t+7 in v. Stages 0-2 pair elements inside
// a thread, 3-7 lanes t ^ 1 .. t ^ 16 of a warp (shuffles), and only when
// L > 8 (uniform across the block) stages 8-10 go through one shared-memory
// pass over sx[8 * kThreads] (with barriers). The same Butterfly calls on the
// same values as HadamardInPlace: bit-identical.
template <int kThreads>
__device__ __forceinline__ void ChunkHadamard8(float* v, int L, float* sx) {
  const int lane = threadIdx.x & 31;
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
  if (L > 8) {
    float4* s4 = reinterpret_cast<float4*>(sx) + 2 * threadIdx.x;
    s4[0] = make_float4(v[0], v[1], v[2], v[3]);
    s4[1] = make_float4(v[4], v[5], v[6], v[7]);
    __syncthreads();
    if (L - 8 == 2) {
      ButterflyPass<2, kThreads>(sx, 8 * kThreads, 8, 30);
    } else {
      ButterflyPass<1, kThreads>(sx, 8 * kThreads, 8, 30);
    }
    __syncthreads();
    const float4 ra = s4[0];
    const float4 rb = s4[1];
    v[0] = ra.x; v[1] = ra.y; v[2] = ra.z; v[3] = ra.w;
    v[4] = rb.x; v[5] = rb.y; v[6] = rb.z; v[7] = rb.w;
  }
}

// HadamardInPlace with blocks of 2^L (L <= log2(TR), TR a power of two <= 32)
// over TR consecutive elements held in registers (one column segment of an
// axis-0 tile): stage s pairs v[i] and v[i + 2^s]. Bit-identical to the
// reference (the same Butterfly calls on the same values).
template <int TR>
__device__ __forceinline__ void RegisterHadamard(float* v, int L) {
#pragma unroll
  for (int s = 0; (1 << s) < TR; ++s) {
    if (s < L) {
#pragma unroll
      for (int i = 0; i < TR; ++i) {
        if ((i & (1 << s)) == 0) Butterfly(v[i], v[i | (1 << s)]);
      }
    }
  }
}

// Largest k <= 10 with 2^k dividing size (hadamard.py `max_log2_block`).
inline int MaxLog2Block(int64_t size) {
  int k = 0;
  while (k < 10 && size > 0 && size % (int64_t{2} << k) == 0) ++k;
  return k;
}

// Launch shape of the column-tile kernels (axis-0 quantize, weight LSQ
// backward) over x[R, S]: tiles of 2^max_log2 rows (the static block when the
// caller knows it, log2_hint >= 0, else the largest dividing R, for a traced
// block) x tile / 2^max_log2 columns. False when the grid would not fit.
inline bool ColumnTiling(int64_t R, int64_t S, int32_t log2_hint, int tile, int* max_log2,
                         dim3* grid) {
  int l = MaxLog2Block(R);
  if (log2_hint >= 0 && log2_hint < l) l = log2_hint;
  const int64_t col_tiles = CeilDivDev(S, tile >> l);
  const int64_t row_tiles = R >> l;
  if (col_tiles > 0x7FFFFFFF) return false;
  *max_log2 = l;
  *grid = dim3(static_cast<unsigned>(col_tiles),
               static_cast<unsigned>(row_tiles < 65535 ? row_tiles : 65535));
  return true;
}

// Reads log2_block from the device scalar, clamped to [0, max_log2].
__device__ __forceinline__ int ClampedLog2(const int32_t* log2_ptr, int max_log2) {
  const int L = *log2_ptr;
  return L < 0 ? 0 : (L > max_log2 ? max_log2 : L);
}

// Decoders of the packed residual at any flat element index e.
__device__ __forceinline__ void DecodeAt(const uint8_t* __restrict__ nibbles,
                                         const uint8_t* __restrict__ flags,
                                         int64_t plane_stride, int planes, int64_t e,
                                         int qn, int qp, int8_t* qv, bool* inside,
                                         float* delta_hat) {
  const uint8_t byte = nibbles[e >> 1];
  const int8_t code = NibbleToInt(static_cast<uint8_t>((byte >> (4 * (e & 1))) & 0xFu));
  uint8_t fl = static_cast<uint8_t>((flags[e >> 3] >> (e & 7)) & 1u);
  if (planes == 2) fl |= static_cast<uint8_t>(((flags[plane_stride + (e >> 3)] >> (e & 7)) & 1u) << 1);
  DecodeBackwardState(code, fl, qn, qp, qv, inside, delta_hat);
}

}  // namespace cuda
}  // namespace jint4

#endif  // JINT4_XLA_FFI_CUDA_DEVICE_UTIL_CUH_
