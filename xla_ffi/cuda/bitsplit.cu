// Bit splitting (CUDA): jint4_bit_split, jint4_bit_split_joined and
// jint4_resplit_rows. All read their input through a "source" functor
// (a float tensor of any float dtype, or gathered int8 rows times a row scale)
// and share the passes:
//   pass 0: cudaMemsetAsync of the scratch (max bits, per-row integer sums).
//   pass 1: m = max|t| with NaN propagation (BlockAbsMaxToGlobal: |t| as uint32
//           bit patterns; every NaN pattern is above +Inf).
//   pass 2: SplitValue per element (f = 98 / SafeMax(m), noise Uniform(i),
//           i = r * C + c). Stacked form: hi to g2[r], lo to g2[R + r] and
//           the integer sums of hi^2 and lo^2 per row (exact in int32 for
//           C < 2^31 / 49). Joined form: v = 14 hi + lo through a 64 x 64
//           shared-memory tile, written as v[R, C] and / or vt[C, R].
//   pass 3: scales = {m * fl(1/7), m * fl(1/98)}; stacked form: norms =
//           scale * sqrt(sum).
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
constexpr int kSplitCols = 4096;  // columns per block in the stacked pass 2
constexpr int kTile = 64;

template <typename T>
struct DenseSource {
  const T* g;
  int64_t C;
  __device__ __forceinline__ float operator()(int64_t r, int64_t c) const {
    return ToFloat(g[r * C + c]);
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

// max|g| over a dense tensor with 8-element vector loads (g aligned, any
// length: the tail is read element by element).
template <typename T>
__global__ void __launch_bounds__(kThreads)
AbsMaxDenseKernel(const T* __restrict__ g, int64_t total, unsigned int* __restrict__ max_bits) {
  uint32_t m = 0;
  const int64_t groups = total >> 3;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < groups;
       i += stride) {
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

// Stacked split of a dense row-major g with C % 8 == 0 and aligned pointers:
// one block per (row, chunk of kSplitCols columns), 8 columns per thread
// step (vector loads, 8-byte stores of hi and lo).
template <typename T>
__global__ void __launch_bounds__(kThreads)
StackedSplitDenseKernel(const T* __restrict__ g, int64_t R, int64_t C, int64_t chunks_per_row,
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
  for (int64_t c = c0 + 8 * threadIdx.x; c < c1; c += 8 * kThreads) {
    const int64_t e = r * C + c;
    float v[8];
    Load8(g + e, v);
    uint32_t hw[2] = {0u, 0u}, lw[2] = {0u, 0u};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      int8_t h, l;
      SplitValue(v[k], f, Uniform(seed0, seed1, static_cast<uint32_t>(e + k)), &h, &l);
      hw[k >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(h)) << (8 * (k & 3));
      lw[k >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(l)) << (8 * (k & 3));
      s_hi += static_cast<int>(h) * static_cast<int>(h);
      s_lo += static_cast<int>(l) * static_cast<int>(l);
    }
    *reinterpret_cast<uint2*>(g2 + e) = make_uint2(hw[0], hw[1]);
    *reinterpret_cast<uint2*>(lo_plane + e) = make_uint2(lw[0], lw[1]);
  }
  AddRowSums(s_hi, s_lo, sums, R, r);
}

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

// Joined digits v = 14 hi + lo through a 64 x 64 tile: v[R, C] (optional)
// and vt[C, R] (optional), each written along its contiguous dim.
template <typename Src>
__global__ void __launch_bounds__(kThreads)
JoinedSplitKernel(Src src, int64_t R, int64_t C,
                  const unsigned int* __restrict__ max_bits,
                  const uint32_t* __restrict__ seed, int8_t* __restrict__ v,
                  int8_t* __restrict__ vt) {
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
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      const int rr = i / kTile;
      const int cc = i - rr * kTile;
      const int64_t r = r0 + rr;
      const int64_t c = c0 + cc;
      int8_t j = 0;
      if (r < R && c < C) {
        int8_t h, l;
        SplitValue(src(r, c), f, Uniform(seed0, seed1, static_cast<uint32_t>(r * C + c)),
                   &h, &l);
        j = static_cast<int8_t>(14 * static_cast<int>(h) + static_cast<int>(l));
        if (v != nullptr) v[r * C + c] = j;
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

ffi::Error BitSplitImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                        ffi::AnyBuffer g, ffi::AnyBuffer seed,
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
  unsigned int* max_bits;
  int* sums;
  err = Scratch(scratch, stream, R, &max_bits, &sums);
  if (err.failure()) return err;
  const uint32_t* sd = reinterpret_cast<const uint32_t*>(seed.untyped_data());
  if (R * C > 0) {
    const int64_t chunks = CeilDiv(C, kSplitCols);
    if (R * chunks > 0x7FFFFFFF) return InvalidArgument("bit_split: too large");
    const bool vec = C % 8 == 0 && IsAligned(g.untyped_data(), 32) &&
                     IsAligned(g2->untyped_data(), 8);
    DispatchFloat(kind, [&](auto tag) {
      using T = decltype(tag);
      const T* gp = reinterpret_cast<const T*>(g.untyped_data());
      int8_t* out = reinterpret_cast<int8_t*>(g2->untyped_data());
      if (vec) {
        AbsMaxDenseKernel<T><<<DenseGrid(R * C), kThreads, 0, stream>>>(gp, R * C, max_bits);
        StackedSplitDenseKernel<T><<<static_cast<unsigned>(R * chunks), kThreads, 0, stream>>>(
            gp, R, C, chunks, max_bits, sd, out, sums);
      } else {
        DenseSource<T> src{gp, C};
        AbsMaxKernel<<<MaxGrid(R, C), kThreads, 0, stream>>>(src, R, C, max_bits);
        StackedSplitKernel<<<static_cast<unsigned>(R * chunks), kThreads, 0, stream>>>(
            src, R, C, chunks, max_bits, sd, out, sums);
      }
    });
  }
  FinalizeKernel<<<RowGrid(R), kThreads, 0, stream>>>(
      R, max_bits, sums, reinterpret_cast<float*>(scales->untyped_data()),
      reinterpret_cast<float*>(norms->untyped_data()));
  return CheckLaunch("bit_split kernel launch");
}

ffi::Error BitSplitJoinedImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                              ffi::AnyBuffer g, ffi::AnyBuffer seed,
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
  unsigned int* max_bits;
  int* sums;
  err = Scratch(scratch, stream, 0, &max_bits, &sums);
  if (err.failure()) return err;
  const uint32_t* sd = reinterpret_cast<const uint32_t*>(seed.untyped_data());
  if (R * C > 0) {
    if (CeilDiv(C, kTile) > 0x7FFFFFFF) return InvalidArgument("bit_split_joined: too large");
    DispatchFloat(kind, [&](auto tag) {
      using T = decltype(tag);
      DenseSource<T> src{reinterpret_cast<const T*>(g.untyped_data()), C};
      if (IsAligned(g.untyped_data(), 32)) {
        AbsMaxDenseKernel<T><<<DenseGrid(R * C), kThreads, 0, stream>>>(
            src.g, R * C, max_bits);
      } else {
        AbsMaxKernel<<<MaxGrid(R, C), kThreads, 0, stream>>>(src, R, C, max_bits);
      }
      JoinedSplitKernel<<<TileGrid(R, C), kThreads, 0, stream>>>(
          src, R, C, max_bits, sd, reinterpret_cast<int8_t*>(v->untyped_data()),
          reinterpret_cast<int8_t*>(vt->untyped_data()));
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
    AbsMaxKernel<<<MaxGrid(J, C), kThreads, 0, stream>>>(src, J, C, max_bits);
    JoinedSplitKernel<<<TileGrid(J, C), kThreads, 0, stream>>>(
        src, J, C, max_bits, reinterpret_cast<const uint32_t*>(seed.untyped_data()), nullptr,
        reinterpret_cast<int8_t*>(vt->untyped_data()));
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
