// Bit splitting (CUDA): jint4_bit_split, jint4_bit_split_joined and
// jint4_resplit_rows. All read their input through a "source" (a float
// tensor of any float dtype, or gathered int8 rows times a row scale) and
// share the passes:
//   pass 0: cudaMemsetAsync of the scratch (max bits, per-row integer sums).
//   pass 1: m = max|t| with NaN propagation (BlockAbsMaxToGlobal: |t| as uint32
//           bit patterns; every NaN pattern is above +Inf). Skipped when the
//           caller passes m (abs_max f32[] of bit_split / bit_split_joined).
//   pass 2: SplitValue per element (f = 98 / SafeMax(m), noise Uniform(i),
//           i = r * C + c). Stacked form: hi to g2[r], lo to g2[R + r] and
//           the integer sums of hi^2 and lo^2 per row (exact in int32 for
//           C < 2^31 / 49). Joined form: v = 14 hi + lo through a shared-memory
//           tile, written as v[R, C] and / or vt[C, R].
//   pass 3: scales = {m * fl(1/7), m * fl(1/98)}; stacked form: norms =
//           scale * sqrt(sum).
// Per-row split (row_inv f32[R] given): bit_split splits the rows
// g[r, :] * row_inv[r] (one float product, as bitsplit.unit_rows) in g's
// place; bit_split_joined writes v from the split of those unit rows with
// m = 1 (f = 98) and vt from g's split with m, both with the same noise, in
// the one pass that reads g.
// The passes are memory-bound: the fast kernels (C % 8 == 0, aligned
// pointers) give every thread several independent vector loads (8 elements
// each), all issued before any arithmetic or store, so that many DRAM
// requests are in flight per thread (memory-level parallelism), and write
// with 8- or 16-byte stores. The scalar kernels are the fallback for ragged
// shapes and misaligned pointers. Every kernel does the same per-element
// arithmetic (bit-identical outputs); only the memory access differs.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/jint4_math.h"
#include "cuda_common.h"
#include "cuda_ffi.h"
#include "device_util.cuh"
#include "handlers.h"

namespace jint4 {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSplitCols = 4096;  // columns per block in the scalar stacked pass 2
constexpr int kTile = 64;         // tile side of the scalar joined pass 2

// Fast stacked pass 2: a warp task is kStackGroups groups of 8 columns per
// lane, kWarpCols consecutive columns of one row.
constexpr int kStackGroups = 4;
constexpr int kWarpCols = 32 * 8 * kStackGroups;

// Fast joined pass 2: tiles of kJRows rows x kJCols columns; thread t owns
// the 8 columns 8 (t % 8) .. + 7 of the 4 rows 4 (t / 8) .. + 3.
constexpr int kJCols = 64;
constexpr int kJRows = 128;
constexpr int kJWords = kJRows / 4;  // 4-row words per tile column
static_assert(kJCols / 8 * kJRows / 4 == kThreads, "one (8 cols, 4 rows) cell per thread");
static_assert(kJCols * kJRows / 16 == 2 * kThreads, "two 16-row vt chunks per thread");
static_assert(kJCols / 8 == 8 && kJWords == 32, "the shared-memory swizzle assumes 8 x 32");

// Max-pass unroll: independent 8-element loads in flight per thread.
constexpr int kMaxUnroll = 4;

template <typename T>
struct DenseSource {
  const T* g;
  int64_t C;
  __device__ __forceinline__ float operator()(int64_t r, int64_t c) const {
    return ToFloat(g[r * C + c]);
  }
};

// Row r of a dense g times row_inv[r] (one float product: bitsplit.unit_rows).
template <typename T>
struct RowScaledSource {
  const T* g;
  const float* row_inv;
  int64_t C;
  __device__ __forceinline__ float operator()(int64_t r, int64_t c) const {
    return ToFloat(g[r * C + c]) * row_inv[r];
  }
};

// Row j is g2[rows[j]] times row_scale[j] (one float product, as reference).
struct GatherSource {
  const int8_t* g2;
  const int32_t* rows;
  const float* row_scale;
  int64_t C;
  __device__ __forceinline__ float operator()(int64_t j, int64_t c) const {
    return static_cast<float>(g2[static_cast<int64_t>(rows[j]) * C + c]) * row_scale[j];
  }
};

// Vector sources of the fast joined kernel: Row8(r, c, x) reads elements
// (r, c .. c + 7) as float, c % 8 == 0, with one 16-byte (dense 16-bit),
// two 16-byte (dense f32) or one 8-byte (int8 gather) load.
template <typename T>
struct DenseSource8 {
  const T* g;  // 16-byte aligned, C % 8 == 0
  int64_t C;
  __device__ __forceinline__ void Row8(int64_t r, int64_t c, float* x) const {
    Load8(g + r * C + c, x);
  }
};

struct GatherSource8 {
  const int8_t* g2;  // 8-byte aligned, C % 8 == 0
  const int32_t* rows;
  const float* row_scale;
  int64_t C;
  __device__ __forceinline__ void Row8(int64_t j, int64_t c, float* x) const {
    const uint2 raw =
        *reinterpret_cast<const uint2*>(g2 + static_cast<int64_t>(rows[j]) * C + c);
    const float s = row_scale[j];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t w = k < 4 ? raw.x : raw.y;
      x[k] = static_cast<float>(static_cast<int8_t>(w >> (8 * (k & 3)))) * s;
    }
  }
};

// Block-wide sums of the hi^2 / lo^2 integer sums of row r, added to
// sums[r] and sums[R + r].
__device__ __forceinline__ void AddRowSums(int s_hi, int s_lo, int* __restrict__ sums,
                                           int64_t R, int64_t r) {
  __shared__ int warp_hi[kThreads / 32];
  __shared__ int warp_lo[kThreads / 32];
  s_hi = WarpSumInt(s_hi);
  s_lo = WarpSumInt(s_lo);
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
    vh = WarpSumInt(vh);
    vl = WarpSumInt(vl);
    if (lane == 0) {
      atomicAdd(&sums[r], vh);
      atomicAdd(&sums[R + r], vl);
    }
  }
}

// Scalar fallback of the max pass (any source, shape or alignment).
template <typename Src>
__global__ void __launch_bounds__(kThreads)
AbsMaxKernel(Src src, int64_t R, int64_t C, unsigned int* __restrict__ max_bits) {
  uint32_t m = 0;
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    for (int64_t c = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; c < C;
         c += static_cast<int64_t>(gridDim.x) * kThreads) {
      const uint32_t bits = AbsBits(src(r, c));
      m = bits > m ? bits : m;
    }
  }
  BlockAbsMaxToGlobal<kThreads>(m, max_bits);
}

// max|g| over a dense tensor (g 16-byte aligned, any length: the tail is
// read element by element). Each thread issues kMaxUnroll independent
// 8-element vector loads (grid-stride apart, so each load instruction of a
// warp stays contiguous) before reducing them.
template <typename T>
__global__ void __launch_bounds__(kThreads)
AbsMaxDenseKernel(const T* __restrict__ g, int64_t total, unsigned int* __restrict__ max_bits) {
  uint32_t m = 0;
  const int64_t groups = total >> 3;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  for (; i + (kMaxUnroll - 1) * stride < groups; i += kMaxUnroll * stride) {
    float v[kMaxUnroll][8];
#pragma unroll
    for (int u = 0; u < kMaxUnroll; ++u) Load8(g + 8 * (i + u * stride), v[u]);
#pragma unroll
    for (int u = 0; u < kMaxUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const uint32_t bits = AbsBits(v[u][k]);
        m = bits > m ? bits : m;
      }
    }
  }
  for (; i < groups; i += stride) {
    float v[8];
    Load8(g + 8 * i, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t bits = AbsBits(v[k]);
      m = bits > m ? bits : m;
    }
  }
  for (int64_t e = 8 * groups + blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
       e < total; e += stride) {
    const uint32_t bits = AbsBits(ToFloat(g[e]));
    m = bits > m ? bits : m;
  }
  BlockAbsMaxToGlobal<kThreads>(m, max_bits);
}

// max|t| of the gathered rows t[j, c] = float(g2[rows[j], c]) * row_scale[j]
// (the same float product as GatherSource), with C % kVec == 0 and g2
// aligned to kVec (8 or 16) bytes. Each warp takes whole rows (rows[j] and
// row_scale[j] read once per lane); each lane issues kMaxUnroll kVec-byte
// loads of its row before reducing them.
template <int kVec>
__global__ void __launch_bounds__(kThreads)
AbsMaxGatherKernel(const int8_t* __restrict__ g2, const int32_t* __restrict__ rows,
                   const float* __restrict__ row_scale, int64_t J, int64_t C,
                   unsigned int* __restrict__ max_bits) {
  using Vec = typename std::conditional<kVec == 16, uint4, uint2>::type;
  const int lane = threadIdx.x & 31;
  const int64_t groups = C / kVec;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t lane_stride = 32 * static_cast<int64_t>(gridDim.y);  // blockIdx.y splits C
  uint32_t m = 0;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(kWarps) + (threadIdx.x >> 5); j < J;
       j += warp_stride) {
    const Vec* row = reinterpret_cast<const Vec*>(g2 + static_cast<int64_t>(rows[j]) * C);
    const float s = row_scale[j];
    for (int64_t i = 32 * static_cast<int64_t>(blockIdx.y) + lane; i < groups;
         i += kMaxUnroll * lane_stride) {
      Vec raw[kMaxUnroll];
#pragma unroll
      for (int u = 0; u < kMaxUnroll; ++u) {
        if (i + u * lane_stride < groups) raw[u] = row[i + u * lane_stride];
      }
#pragma unroll
      for (int u = 0; u < kMaxUnroll; ++u) {
        if (i + u * lane_stride < groups) {
          const uint32_t* w = reinterpret_cast<const uint32_t*>(&raw[u]);
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const float t =
                static_cast<float>(static_cast<int8_t>(w[k >> 2] >> (8 * (k & 3)))) * s;
            const uint32_t bits = AbsBits(t);
            m = bits > m ? bits : m;
          }
        }
      }
    }
  }
  BlockAbsMaxToGlobal<kThreads>(m, max_bits);
}

// Stacked split of a dense row-major g with C % 8 == 0, g 16-byte and g2
// 8-byte aligned. One warp per task (kWarpCols columns of one row, no block
// barrier): lane l loads its kStackGroups groups of 8 columns (8 l + 256 u)
// with all vector loads issued first, then splits them and writes hi and lo
// with 8-byte stores; the warp sums of hi^2 / lo^2 go to sums with one
// atomicAdd each.
// With row_inv, the loaded elements are multiplied by row_inv[r] first.
template <typename T>
__global__ void __launch_bounds__(kThreads)
StackedSplitDenseKernel(const T* __restrict__ g, const float* __restrict__ row_inv,
                        int64_t R, int64_t C, int64_t segs,
                        const unsigned int* __restrict__ max_bits,
                        const uint32_t* __restrict__ seed, int8_t* __restrict__ g2,
                        int* __restrict__ sums /* [2, R] */) {
  const int64_t task = blockIdx.x * static_cast<int64_t>(kWarps) + (threadIdx.x >> 5);
  if (task >= R * segs) return;  // uniform over the warp
  const int lane = threadIdx.x & 31;
  const int64_t r = task / segs;
  const int64_t cb = (task - r * segs) * kWarpCols + 8 * lane;
  const T* row = g + r * C;
  float v[kStackGroups][8];
#pragma unroll
  for (int u = 0; u < kStackGroups; ++u) {
    if (cb + 256 * u < C) Load8(row + cb + 256 * u, v[u]);
  }
  if (row_inv != nullptr) {
    const float inv = row_inv[r];
#pragma unroll
    for (int u = 0; u < kStackGroups; ++u) {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[u][k] *= inv;
    }
  }
  const float f = kSplitRange / SafeMax(__uint_as_float(*max_bits));
  const uint32_t seed0 = seed[0];
  const uint32_t seed1 = seed[1];
  int8_t* lo_plane = g2 + R * C;
  int s_hi = 0, s_lo = 0;
#pragma unroll
  for (int u = 0; u < kStackGroups; ++u) {
    const int64_t c = cb + 256 * u;
    if (c < C) {
      const int64_t e = r * C + c;
      const uint32_t e32 = static_cast<uint32_t>(e);
      uint32_t hw[2] = {0u, 0u}, lw[2] = {0u, 0u};
      float noise[8];
      Uniform8(seed0, seed1, e32, noise);  // e32 even: C % 8 == 0
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        int8_t h, l;
        SplitValue(v[u][k], f, noise[k], &h, &l);
        hw[k >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(h)) << (8 * (k & 3));
        lw[k >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(l)) << (8 * (k & 3));
        s_hi += static_cast<int>(h) * static_cast<int>(h);
        s_lo += static_cast<int>(l) * static_cast<int>(l);
      }
      *reinterpret_cast<uint2*>(g2 + e) = make_uint2(hw[0], hw[1]);
      *reinterpret_cast<uint2*>(lo_plane + e) = make_uint2(lw[0], lw[1]);
    }
  }
  s_hi = WarpSumInt(s_hi);
  s_lo = WarpSumInt(s_lo);
  if (lane == 0) {
    atomicAdd(&sums[r], s_hi);
    atomicAdd(&sums[R + r], s_lo);
  }
}

// Scalar fallback of the stacked split (C % 8 != 0 or misaligned pointers):
// one block per (row, kSplitCols columns), one element per thread step.
template <typename Src>
__global__ void __launch_bounds__(kThreads)
StackedSplitKernel(Src src, int64_t R, int64_t C, int64_t chunks_per_row,
                   const unsigned int* __restrict__ max_bits,
                   const uint32_t* __restrict__ seed, int8_t* __restrict__ g2,
                   int* __restrict__ sums /* [2, R] */) {
  const int64_t r = blockIdx.x / chunks_per_row;
  const int64_t c0 = (blockIdx.x % chunks_per_row) * kSplitCols;
  const int64_t c1 = c0 + kSplitCols < C ? c0 + kSplitCols : C;
  const float f = kSplitRange / SafeMax(__uint_as_float(*max_bits));
  const uint32_t seed0 = seed[0];
  const uint32_t seed1 = seed[1];
  int8_t* lo_plane = g2 + R * C;
  int s_hi = 0, s_lo = 0;
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kThreads) {
    const int64_t e = r * C + c;
    int8_t h, l;
    SplitValue(src(r, c), f, Uniform(seed0, seed1, static_cast<uint32_t>(e)), &h, &l);
    g2[e] = h;
    lo_plane[e] = l;
    s_hi += static_cast<int>(h) * static_cast<int>(h);
    s_lo += static_cast<int>(l) * static_cast<int>(l);
  }
  AddRowSums(s_hi, s_lo, sums, R, r);
}

// Scalar fallback of the joined split (any C, any alignment): v = 14 hi + lo
// through a 64 x 64 tile, one element per thread step: v[R, C] (optional)
// and vt[C, R] (optional), each written along its contiguous dim. With
// row_inv, v holds the split of the unit rows src(r, c) * row_inv[r] (m = 1).
template <typename Src>
__global__ void __launch_bounds__(kThreads)
JoinedSplitKernel(Src src, int64_t R, int64_t C,
                  const unsigned int* __restrict__ max_bits,
                  const uint32_t* __restrict__ seed, int8_t* __restrict__ v,
                  int8_t* __restrict__ vt, const float* __restrict__ row_inv) {
  __shared__ int8_t tile[kTile][kTile + 4];
  const float f = kSplitRange / SafeMax(__uint_as_float(*max_bits));
  const uint32_t seed0 = seed[0];
  const uint32_t seed1 = seed[1];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t r_tiles = CeilDivDev(R, kTile);
  const bool words = vt != nullptr && R % 4 == 0 &&
                     (reinterpret_cast<uintptr_t>(vt) & 3) == 0;
  for (int64_t rt = blockIdx.y; rt < r_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * kTile;
    // Not unrolled: the v stores may alias src, so unrolling buys no
    // overlapping loads, and the unrolled GatherSource form spilled on sm_80.
#pragma unroll 1
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const int rr = i / kTile;
      const int cc = i - rr * kTile;
      const int64_t r = r0 + rr;
      const int64_t c = c0 + cc;
      int8_t j = 0;
      if (r < R && c < C) {
        const float x = src(r, c);
        const float u = Uniform(seed0, seed1, static_cast<uint32_t>(r * C + c));
        int8_t h, l;
        SplitValue(x, f, u, &h, &l);
        j = JoinDigits(h, l);
        if (v != nullptr && row_inv != nullptr) {
          SplitValue(x * row_inv[r], kSplitRange, u, &h, &l);
          v[r * C + c] = JoinDigits(h, l);
        } else if (v != nullptr) {
          v[r * C + c] = j;
        }
      }
      tile[rr][cc] = j;
    }
    __syncthreads();
    if (words) {  // four consecutive r per 4-byte store (R % 4 == 0)
      for (int i = threadIdx.x; i < kTile * kTile / 4; i += kThreads) {
        const int cc = i / (kTile / 4);
        const int rr = 4 * (i - cc * (kTile / 4));
        if (c0 + cc < C && r0 + rr < R) {
          const uint32_t w = static_cast<uint32_t>(static_cast<uint8_t>(tile[rr][cc])) |
                             (static_cast<uint32_t>(static_cast<uint8_t>(tile[rr + 1][cc])) << 8) |
                             (static_cast<uint32_t>(static_cast<uint8_t>(tile[rr + 2][cc])) << 16) |
                             (static_cast<uint32_t>(static_cast<uint8_t>(tile[rr + 3][cc])) << 24);
          *reinterpret_cast<uint32_t*>(vt + (c0 + cc) * R + r0 + rr) = w;
        }
      }
    } else if (vt != nullptr) {
      for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
        const int cc = i / kTile;
        const int rr = i - cc * kTile;
        if (r0 + rr < R && c0 + cc < C) vt[(c0 + cc) * R + r0 + rr] = tile[rr][cc];
      }
    }
    __syncthreads();
  }
}

// Stores the 16 bytes w (vt[c, r .. r + 15], r ascending) at p: n == 16 with
// `width`-byte stores (p aligned to width: 16, 8, 4, or 1 for byte stores),
// else (a chunk cut by R) the first n bytes one by one.
__device__ __forceinline__ void StoreChunk16(int8_t* __restrict__ p, uint4 w, int width,
                                             int n) {
  if (n >= 16 && width == 16) {
    *reinterpret_cast<uint4*>(p) = w;
  } else if (n >= 16 && width == 8) {
    reinterpret_cast<uint2*>(p)[0] = make_uint2(w.x, w.y);
    reinterpret_cast<uint2*>(p)[1] = make_uint2(w.z, w.w);
  } else if (n >= 16 && width == 4) {
    uint32_t* q = reinterpret_cast<uint32_t*>(p);
    q[0] = w.x;
    q[1] = w.y;
    q[2] = w.z;
    q[3] = w.w;
  } else {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      if (b < n) p[b] = static_cast<int8_t>(words[b >> 2] >> (8 * (b & 3)));
    }
  }
}

// Fast joined split (C % 8 == 0, vector source): tiles of kJRows x kJCols.
// Thread t owns cell (rows r0 + 4 (t / 8) .. + 3, columns c0 + 8 (t % 8)
// .. + 7): it issues the 4 row loads of its cell (8 elements each) before any
// arithmetic, computes v = 14 hi + lo, writes each row's 8 digits to v with
// one 8-byte store, and each column's 4 digits (4 consecutive r) as one word
// to the shared tile sT[column][row / 4]. After the barrier thread t writes
// two 16-row chunks of vt[c, r0 ..] (16 bytes read from sT, stored with
// vt_width-byte stores), so a warp writes 4 columns x 128 contiguous bytes.
// kUnitRows: v is written from a second split of each element, of the unit
// row x * row_inv[r] with f = 98 and the same noise (vt keeps g's split).
// The word index of sT is swizzled (q ^ 4 (column / 8)) so both the word
// writes (8 column groups x 4 row quads per warp) and the 16-byte chunk reads
// (8 chunks of one column per quarter warp) hit 32 distinct banks.
template <typename Src, bool kUnitRows = false>
__global__ void __launch_bounds__(kThreads)
JoinedTileKernel(Src src, int64_t R, int64_t C, const unsigned int* __restrict__ max_bits,
                 const uint32_t* __restrict__ seed, int8_t* __restrict__ v,
                 int8_t* __restrict__ vt, int vt_width,
                 const float* __restrict__ row_inv = nullptr) {
  __shared__ __align__(16) uint32_t sT[kJCols][kJWords];
  const float f = kSplitRange / SafeMax(__uint_as_float(*max_bits));
  const uint32_t seed0 = seed[0];
  const uint32_t seed1 = seed[1];
  const int cg = threadIdx.x & 7;   // column group of the cell
  const int q = threadIdx.x >> 3;   // row quad of the cell
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kJCols;
  const int64_t c = c0 + 8 * cg;
  const bool col_ok = c < C;        // C % 8 == 0: all 8 columns or none
  const int64_t r_tiles = CeilDivDev(R, kJRows);
  for (int64_t rt = blockIdx.y; rt < r_tiles; rt += gridDim.y) {
    const int64_t r0 = rt * kJRows;
    const int64_t rb = r0 + 4 * q;
    float x[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (col_ok && rb + i < R) {
        src.Row8(rb + i, c, x[i]);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) x[i][k] = 0.0f;
      }
    }
    // word[k]: the joined digits of rows rb .. rb + 3 of column c + k, byte
    // i = row rb + i, inserted row by row (one byte permute per element).
    // Cells outside the tensor hold x = 0 and are never stored (v: `ok`; vt:
    // StoreChunk16 stops at row R, and columns >= C are skipped).
    uint32_t word[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = rb + i;
      const bool ok = col_ok && r < R;
      const uint32_t e32 = static_cast<uint32_t>(r * C + c);
      float noise[8];
      Uniform8(seed0, seed1, e32, noise);  // e32 even: C % 8 == 0
      uint32_t jb[8];  // the row's joined digits (low bytes)
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        jb[k] = JoinedBits(SplitBits(x[i][k], f, noise[k]));
        // Byte i of word[k] from jb[k]'s low byte (selector nibble 4 = b.byte0).
        constexpr uint32_t kInsert[4] = {0x3214u, 0x3240u, 0x3410u, 0x4210u};
        word[k] = i == 0 ? jb[k] : __byte_perm(word[k], jb[k], kInsert[i]);
      }
      if constexpr (kUnitRows) {
        const float inv = ok ? row_inv[r] : 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          jb[k] = JoinedBits(SplitBits(x[i][k] * inv, kSplitRange, noise[k]));
        }
      }
      if (ok && v != nullptr) *reinterpret_cast<uint2*>(v + r * C + c) = PackLowBytes8(jb);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) sT[8 * cg + k][q ^ (cg << 2)] = word[k];
    __syncthreads();
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int item = threadIdx.x + kThreads * p;
      const int cc = item >> 3;  // tile column
      const int rc = item & 7;   // 16-row chunk
      const int64_t col = c0 + cc;
      const int64_t rs = r0 + 16 * rc;
      if (col < C && rs < R) {
        const uint4 w = *reinterpret_cast<const uint4*>(&sT[cc][4 * (rc ^ (cc >> 3))]);
        const int64_t left = R - rs;
        StoreChunk16(vt + col * R + rs, w, vt_width, left >= 16 ? 16 : static_cast<int>(left));
      }
    }
    __syncthreads();
  }
}

// scales = {m * fl(1/7), m * fl(1/98)}; with sums, the stacked row norms.
__global__ void __launch_bounds__(kThreads)
FinalizeKernel(int64_t R, const unsigned int* __restrict__ max_bits,
               const int* __restrict__ sums, float* __restrict__ scales,
               float* __restrict__ norms) {
  const float m = __uint_as_float(*max_bits);
  const float scale_hi = m * kInvSeven;
  const float scale_lo = m * kInvSplitRange;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    scales[0] = scale_hi;
    scales[1] = scale_lo;
  }
  if (sums == nullptr) return;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < R;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    norms[r] = scale_hi * sqrtf(static_cast<float>(sums[r]));
    norms[R + r] = scale_lo * sqrtf(static_cast<float>(sums[R + r]));
  }
}

// At most 8 x 128 blocks: each block ends in one global atomicMax, and many
// thousands of atomics on one address would serialize.
dim3 MaxGrid(int64_t R, int64_t C) {
  int64_t gx = CeilDiv(C, kThreads);
  gx = gx < 1 ? 1 : (gx > 8 ? 8 : gx);
  int64_t gy = R < 1 ? 1 : (R > 128 ? 128 : R);
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

unsigned DenseGrid(int64_t total) {
  int64_t b = CeilDiv(CeilDiv(total, 8), kThreads);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 1024 ? 1024 : b));
}

dim3 TileGrid(int64_t R, int64_t C) {
  const int64_t gx = CeilDiv(C, kTile);
  const int64_t gy = CeilDiv(R, kTile);
  return dim3(static_cast<unsigned>(gx < 1 ? 1 : gx),
              static_cast<unsigned>(gy < 1 ? 1 : (gy > 65535 ? 65535 : gy)));
}

// Fast joined tiles; row tiles beyond 65535 are looped over.
dim3 JoinedTileGrid(int64_t R, int64_t C) {
  const int64_t gx = CeilDiv(C, kJCols);
  const int64_t gy = CeilDiv(R, kJRows);
  return dim3(static_cast<unsigned>(gx < 1 ? 1 : gx),
              static_cast<unsigned>(gy < 1 ? 1 : (gy > 65535 ? 65535 : gy)));
}

// Widest store of whole 16-row vt chunks that R and the alignment of vt allow.
int VtWidth(int64_t R, const void* vt) {
  if (R % 16 == 0 && IsAligned(vt, 16)) return 16;
  if (R % 8 == 0 && IsAligned(vt, 8)) return 8;
  if (R % 4 == 0 && IsAligned(vt, 4)) return 4;
  return 1;
}

// Gathered max: warps over the J rows (at most 1024 blocks), blockIdx.y over
// the column vectors when J alone gives fewer blocks.
dim3 GatherMaxGrid(int64_t J, int64_t groups) {
  int64_t gx = CeilDiv(J, kWarps);
  gx = gx < 1 ? 1 : (gx > 1024 ? 1024 : gx);
  int64_t gy = CeilDiv(groups, 32 * kMaxUnroll);
  const int64_t want = 1024 / gx;
  gy = gy > want ? want : gy;
  gy = gy < 1 ? 1 : (gy > 1024 ? 1024 : gy);
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

unsigned RowGrid(int64_t R) {
  int64_t b = CeilDiv(R, kThreads);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 4096 ? 4096 : b));
}

// Scratch: [max_bits u32][pad to 256][sums int32[2R] if stacked].
ffi::Error Scratch(ffi::ScratchAllocator& scratch, cudaStream_t stream, int64_t sum_rows,
                   unsigned int** max_bits, int** sums) {
  const size_t sums_off = 256;
  const size_t bytes = sums_off + sizeof(int) * static_cast<size_t>(2 * sum_rows);
  void* buf = nullptr;
  if (!AllocateScratch(scratch, bytes, &buf)) return ScratchError(bytes);
  *max_bits = reinterpret_cast<unsigned int*>(buf);
  *sums = sum_rows > 0 ? reinterpret_cast<int*>(reinterpret_cast<char*>(buf) + sums_off)
                       : nullptr;
  return CheckCuda("bit_split memset", cudaMemsetAsync(buf, 0, bytes, stream));
}

ffi::Error CheckFloatInput(const char* op, ffi::AnyBuffer g, ffi::AnyBuffer seed,
                           FloatKind* kind, int64_t* R, int64_t* C) {
  *kind = KindOf(g.element_type());
  if (*kind == FloatKind::kInvalid || seed.element_type() != ffi::DataType::U32 ||
      seed.element_count() < 2) {
    return InvalidArgument(std::string(op) + ": g must be f32/bf16/f16 and seed u32[2]");
  }
  auto dims = g.dimensions();
  if (dims.size() != 2) return InvalidArgument(std::string(op) + ": g must be [R, C]");
  *R = dims[0];
  *C = dims[1];
  if (*C > (int64_t{1} << 31) / 49) {
    return InvalidArgument(std::string(op) + ": too many columns for exact int32 row sums");
  }
  return ffi::Error::Success();
}

bool IsS8(ffi::Result<ffi::AnyBuffer>& b) { return b->element_type() == ffi::DataType::S8; }
bool IsF32(ffi::Result<ffi::AnyBuffer>& b) { return b->element_type() == ffi::DataType::F32; }

// row_inv: f32[R] (the per-row split) or f32[0]; *rows: its data, or null.
ffi::Error CheckRowInv(const char* op, ffi::AnyBuffer row_inv, int64_t R, const float** rows) {
  if (row_inv.element_type() != ffi::DataType::F32) {
    return InvalidArgument(std::string(op) + ": row_inv must be f32");
  }
  ffi::Error err = ffi_util::CheckOptionalRows(row_inv, R, op, "row_inv");
  if (err.failure()) return err;
  *rows = row_inv.element_count() > 0 ? reinterpret_cast<const float*>(row_inv.untyped_data())
                                      : nullptr;
  return ffi::Error::Success();
}

// abs_max: f32[] holding the caller's m = max|g| (NaN if g holds a NaN; the
// passes read it in place of the max pass), or f32[0]: pass 1 runs. Pass 0
// runs either way (the row sums). row_inv f32[R]: the rows g[r, :] *
// row_inv[r] are split in g's place (abs_max: their max), or f32[0].
ffi::Error BitSplitImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                        ffi::AnyBuffer g, ffi::AnyBuffer seed, ffi::AnyBuffer abs_max,
                        ffi::AnyBuffer row_inv,
                        ffi::Result<ffi::AnyBuffer> g2, ffi::Result<ffi::AnyBuffer> scales,
                        ffi::Result<ffi::AnyBuffer> norms) {
  FloatKind kind;
  int64_t R, C;
  ffi::Error err = CheckFloatInput("bit_split", g, seed, &kind, &R, &C);
  if (err.failure()) return err;
  if (!IsS8(g2) || !IsF32(scales) || !IsF32(norms) ||
      static_cast<int64_t>(g2->element_count()) != 2 * R * C || scales->element_count() != 2 ||
      static_cast<int64_t>(norms->element_count()) != 2 * R) {
    return InvalidArgument("bit_split: results must be g2 s8[2R, C], scales f32[2], norms f32[2R]");
  }
  if (abs_max.element_type() != ffi::DataType::F32 || abs_max.element_count() > 1) {
    return InvalidArgument("bit_split: abs_max must be f32[] (max|g|) or f32[0]");
  }
  const float* inv;
  err = CheckRowInv("bit_split", row_inv, R, &inv);
  if (err.failure()) return err;
  const bool given = abs_max.element_count() == 1;
  unsigned int* max_bits;
  int* sums;
  err = Scratch(scratch, stream, R, &max_bits, &sums);
  if (err.failure()) return err;
  if (given) {  // read only (the max pass is the only writer, and it is skipped)
    max_bits = const_cast<unsigned int*>(
        reinterpret_cast<const unsigned int*>(abs_max.untyped_data()));
  }
  const uint32_t* sd = reinterpret_cast<const uint32_t*>(seed.untyped_data());
  if (R * C > 0) {
    const int64_t chunks = CeilDiv(C, kSplitCols);
    if (R * chunks > 0x7FFFFFFF) return InvalidArgument("bit_split: too large");
    // Fast path: whole 8-column groups per row, 16-byte vector loads of g,
    // 8-byte stores into g2 (its lo plane starts R * C, a multiple of 8, in).
    const bool vec = C % 8 == 0 && IsAligned(g.untyped_data(), 16) &&
                     IsAligned(g2->untyped_data(), 8);
    const int64_t segs = CeilDiv(C, kWarpCols);
    const int64_t vec_blocks = CeilDiv(R * segs, kWarps);  // <= R * chunks
    DispatchFloat(kind, [&](auto tag) {
      using T = decltype(tag);
      const T* gp = reinterpret_cast<const T*>(g.untyped_data());
      int8_t* out = reinterpret_cast<int8_t*>(g2->untyped_data());
      if (!given && inv != nullptr) {  // the max of the scaled rows
        AbsMaxKernel<<<MaxGrid(R, C), kThreads, 0, stream>>>(RowScaledSource<T>{gp, inv, C},
                                                             R, C, max_bits);
      } else if (!given && vec) {
        AbsMaxDenseKernel<T><<<DenseGrid(R * C), kThreads, 0, stream>>>(gp, R * C, max_bits);
      } else if (!given) {
        AbsMaxKernel<<<MaxGrid(R, C), kThreads, 0, stream>>>(DenseSource<T>{gp, C}, R, C,
                                                             max_bits);
      }
      if (vec) {
        StackedSplitDenseKernel<T><<<static_cast<unsigned>(vec_blocks), kThreads, 0, stream>>>(
            gp, inv, R, C, segs, max_bits, sd, out, sums);
      } else if (inv != nullptr) {
        StackedSplitKernel<<<static_cast<unsigned>(R * chunks), kThreads, 0, stream>>>(
            RowScaledSource<T>{gp, inv, C}, R, C, chunks, max_bits, sd, out, sums);
      } else {
        StackedSplitKernel<<<static_cast<unsigned>(R * chunks), kThreads, 0, stream>>>(
            DenseSource<T>{gp, C}, R, C, chunks, max_bits, sd, out, sums);
      }
    });
  }
  FinalizeKernel<<<RowGrid(R), kThreads, 0, stream>>>(
      R, max_bits, sums, reinterpret_cast<float*>(scales->untyped_data()),
      reinterpret_cast<float*>(norms->untyped_data()));
  return CheckLaunch("bit_split kernel launch");
}

// abs_max: f32[] holding the caller's m = max|g| (NaN if g holds a NaN; the
// passes read it in place of the max pass), or f32[0]: pass 0 and pass 1 run.
// row_inv f32[R]: v is the split of the unit rows g[r, :] * row_inv[r] with
// m = 1 (vt and the scales stay g's), or f32[0].
ffi::Error BitSplitJoinedImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                              ffi::AnyBuffer g, ffi::AnyBuffer seed, ffi::AnyBuffer abs_max,
                              ffi::AnyBuffer row_inv,
                              ffi::Result<ffi::AnyBuffer> v, ffi::Result<ffi::AnyBuffer> vt,
                              ffi::Result<ffi::AnyBuffer> scales) {
  FloatKind kind;
  int64_t R, C;
  ffi::Error err = CheckFloatInput("bit_split_joined", g, seed, &kind, &R, &C);
  if (err.failure()) return err;
  if (!IsS8(v) || !IsS8(vt) || !IsF32(scales) ||
      static_cast<int64_t>(v->element_count()) != R * C ||
      static_cast<int64_t>(vt->element_count()) != R * C || scales->element_count() != 2) {
    return InvalidArgument("bit_split_joined: results must be v s8[R, C], vt s8[C, R],"
                           " scales f32[2]");
  }
  if (abs_max.element_type() != ffi::DataType::F32 || abs_max.element_count() > 1) {
    return InvalidArgument("bit_split_joined: abs_max must be f32[] (max|g|) or f32[0]");
  }
  const float* inv;
  err = CheckRowInv("bit_split_joined", row_inv, R, &inv);
  if (err.failure()) return err;
  const bool given = abs_max.element_count() == 1;
  unsigned int* max_bits = nullptr;
  if (given) {  // read only (the max pass is the only writer)
    max_bits = const_cast<unsigned int*>(
        reinterpret_cast<const unsigned int*>(abs_max.untyped_data()));
  } else {
    int* sums;
    err = Scratch(scratch, stream, 0, &max_bits, &sums);
    if (err.failure()) return err;
  }
  const uint32_t* sd = reinterpret_cast<const uint32_t*>(seed.untyped_data());
  if (R * C > 0) {
    if (CeilDiv(C, kTile) > 0x7FFFFFFF) return InvalidArgument("bit_split_joined: too large");
    // Fast path: 16-byte loads of g and 8-byte stores of v need whole
    // 8-column groups; vt takes any R (VtWidth picks its store width).
    const bool aligned = IsAligned(g.untyped_data(), 16);
    const bool vec = C % 8 == 0 && aligned && IsAligned(v->untyped_data(), 8);
    const int vt_width = VtWidth(R, vt->untyped_data());
    DispatchFloat(kind, [&](auto tag) {
      using T = decltype(tag);
      DenseSource<T> src{reinterpret_cast<const T*>(g.untyped_data()), C};
      int8_t* vp = reinterpret_cast<int8_t*>(v->untyped_data());
      int8_t* vtp = reinterpret_cast<int8_t*>(vt->untyped_data());
      if (!given && aligned) {
        AbsMaxDenseKernel<T><<<DenseGrid(R * C), kThreads, 0, stream>>>(
            src.g, R * C, max_bits);
      } else if (!given) {
        AbsMaxKernel<<<MaxGrid(R, C), kThreads, 0, stream>>>(src, R, C, max_bits);
      }
      if (vec && inv != nullptr) {
        JoinedTileKernel<DenseSource8<T>, true><<<JoinedTileGrid(R, C), kThreads, 0, stream>>>(
            DenseSource8<T>{src.g, C}, R, C, max_bits, sd, vp, vtp, vt_width, inv);
      } else if (vec) {
        JoinedTileKernel<<<JoinedTileGrid(R, C), kThreads, 0, stream>>>(
            DenseSource8<T>{src.g, C}, R, C, max_bits, sd, vp, vtp, vt_width);
      } else {
        JoinedSplitKernel<<<TileGrid(R, C), kThreads, 0, stream>>>(src, R, C, max_bits, sd,
                                                                    vp, vtp, inv);
      }
    });
  }
  FinalizeKernel<<<1, kThreads, 0, stream>>>(
      0, max_bits, nullptr, reinterpret_cast<float*>(scales->untyped_data()), nullptr);
  return CheckLaunch("bit_split_joined kernel launch");
}

ffi::Error ResplitRowsImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                           ffi::AnyBuffer g2, ffi::AnyBuffer rows, ffi::AnyBuffer row_scale,
                           ffi::AnyBuffer seed, ffi::Result<ffi::AnyBuffer> vt,
                           ffi::Result<ffi::AnyBuffer> scales) {
  if (g2.element_type() != ffi::DataType::S8 || rows.element_type() != ffi::DataType::S32 ||
      row_scale.element_type() != ffi::DataType::F32 ||
      seed.element_type() != ffi::DataType::U32 || seed.element_count() < 2 || !IsS8(vt) ||
      !IsF32(scales)) {
    return InvalidArgument("resplit_rows: g2 s8, rows s32, row_scale f32, seed u32[2];"
                           " results vt s8, scales f32");
  }
  auto gd = g2.dimensions();
  auto vd = vt->dimensions();
  const int64_t J = static_cast<int64_t>(rows.element_count());
  if (gd.size() != 2 || vd.size() != 2 || vd[0] != gd[1] || vd[1] != J ||
      static_cast<int64_t>(row_scale.element_count()) != J || scales->element_count() != 2) {
    return InvalidArgument("resplit_rows: shapes must be g2[R2, C], rows[J], row_scale[J],"
                           " vt[C, J], scales[2]");
  }
  const int64_t C = gd[1];
  unsigned int* max_bits;
  int* sums;
  ffi::Error err = Scratch(scratch, stream, 0, &max_bits, &sums);
  if (err.failure()) return err;
  if (J * C > 0) {
    GatherSource src{reinterpret_cast<const int8_t*>(g2.untyped_data()),
                     reinterpret_cast<const int32_t*>(rows.untyped_data()),
                     reinterpret_cast<const float*>(row_scale.untyped_data()), C};
    const uint32_t* sd = reinterpret_cast<const uint32_t*>(seed.untyped_data());
    int8_t* vtp = reinterpret_cast<int8_t*>(vt->untyped_data());
    // Fast paths: 16- or 8-byte loads of the gathered int8 rows (C a multiple
    // of the load width, g2 aligned to it; every row start is then aligned).
    if (C % 16 == 0 && IsAligned(src.g2, 16)) {
      AbsMaxGatherKernel<16><<<GatherMaxGrid(J, C / 16), kThreads, 0, stream>>>(
          src.g2, src.rows, src.row_scale, J, C, max_bits);
    } else if (C % 8 == 0 && IsAligned(src.g2, 8)) {
      AbsMaxGatherKernel<8><<<GatherMaxGrid(J, C / 8), kThreads, 0, stream>>>(
          src.g2, src.rows, src.row_scale, J, C, max_bits);
    } else {
      AbsMaxKernel<<<MaxGrid(J, C), kThreads, 0, stream>>>(src, J, C, max_bits);
    }
    if (C % 8 == 0 && IsAligned(src.g2, 8)) {
      JoinedTileKernel<<<JoinedTileGrid(J, C), kThreads, 0, stream>>>(
          GatherSource8{src.g2, src.rows, src.row_scale, C}, J, C, max_bits, sd, nullptr, vtp,
          VtWidth(J, vtp));
    } else {
      JoinedSplitKernel<<<TileGrid(J, C), kThreads, 0, stream>>>(src, J, C, max_bits, sd,
                                                                  nullptr, vtp, nullptr);
    }
  }
  FinalizeKernel<<<1, kThreads, 0, stream>>>(
      0, max_bits, nullptr, reinterpret_cast<float*>(scales->untyped_data()), nullptr);
  return CheckLaunch("resplit_rows kernel launch");
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_bit_split, jint4::cuda::BitSplitImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()     // g f32 | bf16 | f16 [R, C]
        .Arg<xla::ffi::AnyBuffer>()     // seed u32[2]
        .Arg<xla::ffi::AnyBuffer>()     // abs_max f32[] or f32[0]
        .Arg<xla::ffi::AnyBuffer>()     // row_inv f32[R] or f32[0]
        .Ret<xla::ffi::AnyBuffer>()     // g2 s8[2R, C]
        .Ret<xla::ffi::AnyBuffer>()     // scales f32[2]
        .Ret<xla::ffi::AnyBuffer>()     // norms f32[2R]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_bit_split_joined, jint4::cuda::BitSplitJoinedImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()     // g f32 | bf16 | f16 [R, C]
        .Arg<xla::ffi::AnyBuffer>()     // seed u32[2]
        .Arg<xla::ffi::AnyBuffer>()     // abs_max f32[] or f32[0]
        .Arg<xla::ffi::AnyBuffer>()     // row_inv f32[R] or f32[0]
        .Ret<xla::ffi::AnyBuffer>()     // v s8[R, C]
        .Ret<xla::ffi::AnyBuffer>()     // vt s8[C, R]
        .Ret<xla::ffi::AnyBuffer>()     // scales f32[2]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_resplit_rows, jint4::cuda::ResplitRowsImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()     // g2 s8[R2, C]
        .Arg<xla::ffi::AnyBuffer>()     // rows s32[J]
        .Arg<xla::ffi::AnyBuffer>()     // row_scale f32[J]
        .Arg<xla::ffi::AnyBuffer>()     // seed u32[2]
        .Ret<xla::ffi::AnyBuffer>()     // vt s8[C, J]
        .Ret<xla::ffi::AnyBuffer>()     // scales f32[2]
);
