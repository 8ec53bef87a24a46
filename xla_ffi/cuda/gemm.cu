// jint4_int_gemm (CUDA): the handler, runtime
// dispatch on the device's compute capability, and the small kernels around
// the CUTLASS GEMMs.
//
// Paths (RunGemm):
//   * compute 9.0 (H100 / H200): gemm_sm90.cu, CUTLASS 3 INT8 wgmma (128x256x128
//     cooperative, cluster 1x2) with the fused EVT epilogue
//     ((acc * scale) * row_scale[m]) + col_bias[n] writing f32 / bf16.
//     K % 16 != 0 or a misaligned operand: the operand is copied into a
//     zero-padded scratch [rows, round_up(K, 16)]; N * sizeof(out) % 16 != 0
//     or a misaligned out: the GEMM writes a scratch [M, round_up(N, 16 /
//     sizeof(out))] copied into out afterwards.
//   * compute 8.x: gemm_sm80.cu, CUTLASS 2 INT4 tensor cores. The operands are
//     packed int8 -> int4 into scratch (K zero-padded to a multiple of 32;
//     values must lie in [-8, 7]: only when the op's int4 attribute says so,
//     else (joined bit-split digits) the fallback runs); the GEMM
//     writes alpha * acc (f32) into a scratch slab of at most 64 MiB (M is
//     processed in slabs of rows), then an elementwise kernel applies
//     row_scale and the cast to out's dtype.
//   * anything else, K == 0, sizes beyond int32, or a CUTLASS can_implement
//     refusal: FallbackGemmKernel, a plain shared-memory tiled int32 GEMM
//     (any M, N, K, any alignment, any int8 values).
// JINT4_CUDA_GEMM=auto|fallback|sm80|sm90 (environment, read per call) forces
// a path for testing: sm90 only takes effect on compute 9.0; sm80 on compute
// >= 8 (on 9.0 it runs the same CUTLASS 2 kernel compiled for sm_90a).
//
// The transposes and row gathers the backward GEMMs need are written by the
// kernels that produce their operands (quantize, residual decode, bit split),
// so every GEMM here is TN: a[M, K] . b[N, K]^T.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda_common.h"
#include "cuda_ffi.h"
#include "gemm_kernels.h"
#include "handlers.h"

namespace jint4 {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

template <typename T>
__device__ __forceinline__ T ConvertOut(float v);
template <>
__device__ __forceinline__ float ConvertOut<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 ConvertOut<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------
// Fallback GEMM: out[m, n] = cvt((float(sum_k a[m, k] b[n, k]) * scale) *
// row_scale[m]). 32 x 32 outputs per block of 256 threads (2 x 2 each), K in
// steps of 32 through shared memory, int32 accumulation, every access
// bounds-checked.
// The op's epilogue after acc * scale: times row_scale[m], plus col_bias[n]
// (the sm_90a path computes the same in its CUTLASS EVT).
__device__ __forceinline__ float Epilogue(float v, const float* __restrict__ row_scale,
                                          const float* __restrict__ col_bias, int64_t m,
                                          int64_t n) {
  if (row_scale != nullptr) v = v * row_scale[m];
  if (col_bias != nullptr) v = v + col_bias[n];
  return v;
}

constexpr int kFbTile = 32;

template <typename OutT>
__global__ void __launch_bounds__(kThreads)
FallbackGemmKernel(const int8_t* __restrict__ a, int64_t lda,
                   const int8_t* __restrict__ b, int64_t ldb, int64_t M,
                   int64_t N, int64_t K, const float* __restrict__ scale,
                   const float* __restrict__ row_scale,
                   const float* __restrict__ col_bias, OutT* __restrict__ out,
                   int64_t ldo) {
  __shared__ int sa[kFbTile][kFbTile + 1];
  __shared__ int sb[kFbTile][kFbTile + 1];
  const int tx = threadIdx.x & 15;
  const int ty = threadIdx.x >> 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kFbTile;
  const int64_t n_tiles = (N + kFbTile - 1) / kFbTile;
  const float s = *scale;
  for (int64_t nt = blockIdx.y; nt < n_tiles; nt += gridDim.y) {
    const int64_t n0 = nt * kFbTile;
    int acc00 = 0, acc01 = 0, acc10 = 0, acc11 = 0;
    for (int64_t k0 = 0; k0 < K; k0 += kFbTile) {
      for (int i = threadIdx.x; i < kFbTile * kFbTile; i += kThreads) {
        const int r = i / kFbTile;
        const int kk = i % kFbTile;
        const int64_t k = k0 + kk;
        const int64_t m = m0 + r;
        const int64_t n = n0 + r;
        sa[r][kk] = (m < M && k < K) ? static_cast<int>(a[m * lda + k]) : 0;
        sb[r][kk] = (n < N && k < K) ? static_cast<int>(b[n * ldb + k]) : 0;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kFbTile; ++kk) {
        const int a0 = sa[ty][kk];
        const int a1 = sa[ty + 16][kk];
        const int b0 = sb[tx][kk];
        const int b1 = sb[tx + 16][kk];
        acc00 += a0 * b0;
        acc01 += a0 * b1;
        acc10 += a1 * b0;
        acc11 += a1 * b1;
      }
      __syncthreads();
    }
    const int acc[2][2] = {{acc00, acc01}, {acc10, acc11}};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t m = m0 + ty + 16 * i;
        const int64_t n = n0 + tx + 16 * j;
        if (m < M && n < N) {
          out[m * ldo + n] = ConvertOut<OutT>(
              Epilogue(static_cast<float>(acc[i][j]) * s, row_scale, col_bias, m, n));
        }
      }
    }
  }
}

// dst[r, c] = c < cols ? src[r * lds + c] : 0, for c < ldd (zero K padding).
__global__ void __launch_bounds__(kThreads)
PadRowsKernel(const int8_t* __restrict__ src, int64_t lds, int64_t rows,
              int64_t cols, int8_t* __restrict__ dst, int64_t ldd) {
  const int64_t total = rows * ldd;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < total; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / ldd;
    const int64_t c = i - r * ldd;
    dst[i] = c < cols ? src[r * lds + c] : int8_t{0};
  }
}

// int8 [rows, cols] (leading dim lds) -> packed int4 [rows, dst_ld_bytes]:
// byte j of row r = (src[r, 2j] & 0xF) | (src[r, 2j + 1] << 4), 0 past cols.
__global__ void __launch_bounds__(kThreads)
PackInt4Kernel(const int8_t* __restrict__ src, int64_t lds, int64_t rows,
               int64_t cols, uint8_t* __restrict__ dst, int64_t dst_ld_bytes) {
  const int64_t total = rows * dst_ld_bytes;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < total; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dst_ld_bytes;
    const int64_t c = 2 * (i - r * dst_ld_bytes);
    const uint32_t lo = c < cols ? static_cast<uint32_t>(static_cast<uint8_t>(src[r * lds + c])) & 0xFu : 0u;
    const uint32_t hi = c + 1 < cols ? static_cast<uint32_t>(static_cast<uint8_t>(src[r * lds + c + 1])) & 0xFu : 0u;
    dst[i] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kThreads)
RowScaleKernel(const float* __restrict__ tmp, int64_t ldt, int64_t rows,
               int64_t cols, const float* __restrict__ row_scale,
               const float* __restrict__ col_bias, OutT* __restrict__ out, int64_t ldo) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < total; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / cols;
    const int64_t n = i - m * cols;
    out[m * ldo + n] = ConvertOut<OutT>(Epilogue(tmp[m * ldt + n], row_scale, col_bias, m, n));
  }
}

// dst[m, n] = src[m * lds + n] (elements of `bytes` bytes).
template <typename T>
__global__ void __launch_bounds__(kThreads)
CopyRowsKernel(const T* __restrict__ src, int64_t lds, int64_t rows,
               int64_t cols, T* __restrict__ dst, int64_t ldd) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < total; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / cols;
    const int64_t n = i - m * cols;
    dst[m * ldd + n] = src[m * lds + n];
  }
}

unsigned ElementwiseGrid(int64_t total) {
  int64_t blocks = CeilDiv(total, kThreads);
  if (blocks > 65536) blocks = 65536;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

// ---------------------------------------------------------------------------

struct GemmDesc {
  const int8_t* a = nullptr;  // [M, K], leading dim lda
  int64_t lda = 0;
  const int8_t* b = nullptr;  // [N, K], leading dim ldb
  int64_t ldb = 0;
  int64_t M = 0, N = 0, K = 0;
  const float* scale = nullptr;      // device scalar
  const float* row_scale = nullptr;  // device [M] or nullptr
  const float* col_bias = nullptr;   // device [N] or nullptr
  void* out = nullptr;               // [M, N] row-major
  bool bf16 = false;
  bool int4 = true;  // values in [-8, 7]: INT4 tensor cores may run it
};

enum class GemmPath { kAuto, kFallback, kSm80, kSm90 };

GemmPath RequestedPath() {
  const char* env = std::getenv("JINT4_CUDA_GEMM");
  if (env == nullptr) return GemmPath::kAuto;
  if (std::strcmp(env, "fallback") == 0) return GemmPath::kFallback;
  if (std::strcmp(env, "sm80") == 0) return GemmPath::kSm80;
  if (std::strcmp(env, "sm90") == 0) return GemmPath::kSm90;
  return GemmPath::kAuto;
}

ffi::Error RunFallback(cudaStream_t stream, const GemmDesc& d) {
  const int64_t m_tiles = CeilDiv(d.M, kFbTile);
  const int64_t n_tiles = CeilDiv(d.N, kFbTile);
  if (m_tiles > 0x7FFFFFFF) return InvalidArgument("int_gemm: M too large");
  dim3 grid(static_cast<unsigned>(m_tiles),
            static_cast<unsigned>(n_tiles < kMaxGridY ? n_tiles : kMaxGridY));
  if (d.bf16) {
    FallbackGemmKernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
        d.a, d.lda, d.b, d.ldb, d.M, d.N, d.K, d.scale, d.row_scale, d.col_bias,
        reinterpret_cast<__nv_bfloat16*>(d.out), d.N);
  } else {
    FallbackGemmKernel<float><<<grid, kThreads, 0, stream>>>(
        d.a, d.lda, d.b, d.ldb, d.M, d.N, d.K, d.scale, d.row_scale, d.col_bias,
        reinterpret_cast<float*>(d.out), d.N);
  }
  return CheckLaunch("int_gemm fallback kernel launch");
}

// Returns an operand [rows, K] with leading dim K, K % 16 == 0 and 16-byte
// alignment as the sm90 kernel needs it: `src` itself, or a zero-padded copy.
ffi::Error PrepareSm90Operand(cudaStream_t stream, ffi::ScratchAllocator& scratch,
                              const int8_t* src, int64_t lds, int64_t rows,
                              int64_t K, int64_t Kp, const int8_t** result) {
  if (Kp == K && lds == K && IsAligned(src, 16)) {
    *result = src;
    return ffi::Error::Success();
  }
  const size_t bytes = static_cast<size_t>(rows * Kp);
  void* buf = nullptr;
  if (!AllocateScratch(scratch, bytes, &buf)) return ScratchError(bytes);
  if (rows * Kp > 0) {
    PadRowsKernel<<<ElementwiseGrid(rows * Kp), kThreads, 0, stream>>>(
        src, lds, rows, K, reinterpret_cast<int8_t*>(buf), Kp);
  }
  *result = reinterpret_cast<const int8_t*>(buf);
  return CheckLaunch("int_gemm pad kernel launch");
}

// Tries the sm90 CUTLASS path; *done = false asks for the fallback.
ffi::Error RunSm90(cudaStream_t stream, ffi::ScratchAllocator& scratch,
                   const GemmDesc& d, const DeviceInfo& info, bool* done) {
  *done = false;
  const int64_t Kp = RoundUp(d.K, 16);
  if (d.M > INT_MAX || d.N > INT_MAX || Kp > INT_MAX) return ffi::Error::Success();
  const int64_t es = d.bf16 ? 2 : 4;
  const bool direct_out = (d.N * es) % 16 == 0 && IsAligned(d.out, 16);
  const int64_t ldo = direct_out ? d.N : RoundUp(d.N, 16 / es);
  if (ldo > INT_MAX) return ffi::Error::Success();

  const int8_t* a = nullptr;
  const int8_t* b = nullptr;
  ffi::Error err = PrepareSm90Operand(stream, scratch, d.a, d.lda, d.M, d.K, Kp, &a);
  if (err.failure()) return err;
  err = PrepareSm90Operand(stream, scratch, d.b, d.ldb, d.N, d.K, Kp, &b);
  if (err.failure()) return err;

  void* out = d.out;
  if (!direct_out) {
    const size_t bytes = static_cast<size_t>(d.M * ldo * es);
    if (!AllocateScratch(scratch, bytes, &out)) return ScratchError(bytes);
  }

  Sm90GemmArgs args;
  args.a = a;
  args.b = b;
  args.M = static_cast<int>(d.M);
  args.N = static_cast<int>(d.N);
  args.K = static_cast<int>(Kp);
  args.scale = d.scale;
  args.row_scale = d.row_scale;
  args.col_bias = d.col_bias;
  args.out = out;
  args.ldo = ldo;
  args.out_bf16 = d.bf16;
  args.device = info.device;
  args.sm_count = info.sm_count;
  std::string message;
  ScratchFn alloc = [&scratch](size_t bytes) -> void* {
    void* p = nullptr;
    return AllocateScratch(scratch, bytes, &p) ? p : nullptr;
  };
  GemmStatus st = Sm90Gemm(args, alloc, stream, &message);
  if (st == GemmStatus::kUnsupported) return ffi::Error::Success();  // fallback
  if (st != GemmStatus::kOk) return ffi::Error::Internal("jint4 CUDA: " + message);

  if (!direct_out) {
    if (d.bf16) {
      CopyRowsKernel<uint16_t><<<ElementwiseGrid(d.M * d.N), kThreads, 0, stream>>>(
          reinterpret_cast<const uint16_t*>(out), ldo, d.M, d.N,
          reinterpret_cast<uint16_t*>(d.out), d.N);
    } else {
      CopyRowsKernel<float><<<ElementwiseGrid(d.M * d.N), kThreads, 0, stream>>>(
          reinterpret_cast<const float*>(out), ldo, d.M, d.N,
          reinterpret_cast<float*>(d.out), d.N);
    }
    err = CheckLaunch("int_gemm copy-out kernel launch");
    if (err.failure()) return err;
  }
  *done = true;
  return ffi::Error::Success();
}

// Tries the sm80 INT4 CUTLASS path; *done = false asks for the fallback.
ffi::Error RunSm80(cudaStream_t stream, ffi::ScratchAllocator& scratch,
                   const GemmDesc& d, bool* done) {
  *done = false;
  const int64_t Kp = RoundUp(d.K, 32);
  const int64_t Np = RoundUp(d.N, 4);
  if (d.M > INT_MAX || d.N > INT_MAX || Kp > INT_MAX) return ffi::Error::Success();
  const int64_t row_bytes = Kp / 2;

  void* a4 = nullptr;
  void* b4 = nullptr;
  const size_t a_bytes = static_cast<size_t>(d.M * row_bytes);
  const size_t b_bytes = static_cast<size_t>(d.N * row_bytes);
  if (!AllocateScratch(scratch, a_bytes, &a4)) return ScratchError(a_bytes);
  if (!AllocateScratch(scratch, b_bytes, &b4)) return ScratchError(b_bytes);
  PackInt4Kernel<<<ElementwiseGrid(d.M * row_bytes), kThreads, 0, stream>>>(
      d.a, d.lda, d.M, d.K, reinterpret_cast<uint8_t*>(a4), row_bytes);
  PackInt4Kernel<<<ElementwiseGrid(d.N * row_bytes), kThreads, 0, stream>>>(
      d.b, d.ldb, d.N, d.K, reinterpret_cast<uint8_t*>(b4), row_bytes);
  ffi::Error err = CheckLaunch("int_gemm int4 pack kernel launch");
  if (err.failure()) return err;

  // f32 slab of at most 64 MiB (at least 128 rows).
  constexpr int64_t kSlabBytes = int64_t{64} << 20;
  int64_t mc = (kSlabBytes / (Np * 4)) / 128 * 128;
  if (mc < 128) mc = 128;
  if (mc > d.M) mc = d.M;
  const size_t tmp_bytes = static_cast<size_t>(mc * Np * 4);
  void* tmp = nullptr;
  if (!AllocateScratch(scratch, tmp_bytes, &tmp)) return ScratchError(tmp_bytes);

  ScratchFn alloc = [&scratch](size_t bytes) -> void* {
    void* p = nullptr;
    return AllocateScratch(scratch, bytes, &p) ? p : nullptr;
  };
  for (int64_t m0 = 0; m0 < d.M; m0 += mc) {
    const int64_t rows = d.M - m0 < mc ? d.M - m0 : mc;
    Sm80Int4GemmArgs args;
    args.a4 = reinterpret_cast<const uint8_t*>(a4) + m0 * row_bytes;
    args.b4 = b4;
    args.M = static_cast<int>(rows);
    args.N = static_cast<int>(d.N);
    args.K = static_cast<int>(Kp);
    args.alpha = d.scale;
    args.d = reinterpret_cast<float*>(tmp);
    args.ldd = Np;
    std::string message;
    GemmStatus st = Sm80Int4Gemm(args, alloc, stream, &message);
    if (st == GemmStatus::kUnsupported && m0 == 0) return ffi::Error::Success();
    if (st != GemmStatus::kOk) return ffi::Error::Internal("jint4 CUDA: " + message);
    const float* rs = d.row_scale != nullptr ? d.row_scale + m0 : nullptr;
    if (d.bf16) {
      RowScaleKernel<__nv_bfloat16><<<ElementwiseGrid(rows * d.N), kThreads, 0, stream>>>(
          reinterpret_cast<const float*>(tmp), Np, rows, d.N, rs, d.col_bias,
          reinterpret_cast<__nv_bfloat16*>(d.out) + m0 * d.N, d.N);
    } else {
      RowScaleKernel<float><<<ElementwiseGrid(rows * d.N), kThreads, 0, stream>>>(
          reinterpret_cast<const float*>(tmp), Np, rows, d.N, rs, d.col_bias,
          reinterpret_cast<float*>(d.out) + m0 * d.N, d.N);
    }
    err = CheckLaunch("int_gemm row-scale kernel launch");
    if (err.failure()) return err;
  }
  *done = true;
  return ffi::Error::Success();
}

ffi::Error RunGemm(cudaStream_t stream, ffi::ScratchAllocator& scratch,
                   const GemmDesc& d) {
  if (d.M == 0 || d.N == 0) return ffi::Error::Success();
  DeviceInfo info;
  ffi::Error err = CheckCuda("cudaGetDevice / cudaDeviceGetAttribute", GetDeviceInfo(&info));
  if (err.failure()) return err;
  const GemmPath path = RequestedPath();
  if (d.K > 0 && path != GemmPath::kFallback) {
    const bool is_sm90 = info.cc_major == 9 && info.cc_minor == 0;
    const bool want90 = is_sm90 && Sm90GemmAvailable() &&
                        (path == GemmPath::kAuto || path == GemmPath::kSm90);
    const bool want80 = d.int4 && ((path == GemmPath::kAuto && info.cc_major == 8) ||
                                   (path == GemmPath::kSm80 && info.cc_major >= 8));
    bool done = false;
    if (want90) {
      err = RunSm90(stream, scratch, d, info, &done);
      if (err.failure() || done) return err;
    } else if (want80) {
      err = RunSm80(stream, scratch, d, &done);
      if (err.failure() || done) return err;
    }
  }
  return RunFallback(stream, d);
}

// ---------------------------------------------------------------------------
// Handlers.

ffi::Error IntGemmImpl(cudaStream_t stream, ffi::ScratchAllocator scratch,
                       ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer scale,
                       ffi::AnyBuffer row_scale, ffi::AnyBuffer col_bias,
                       ffi::Result<ffi::AnyBuffer> out, int32_t int4) {
  if (a.element_type() != ffi::DataType::S8 || b.element_type() != ffi::DataType::S8 ||
      scale.element_type() != ffi::DataType::F32 ||
      row_scale.element_type() != ffi::DataType::F32 ||
      col_bias.element_type() != ffi::DataType::F32) {
    return InvalidArgument("int_gemm: a, b must be int8; scale, row_scale, col_bias float32");
  }
  const bool bf16 = out->element_type() == ffi::DataType::BF16;
  if (!bf16 && out->element_type() != ffi::DataType::F32) {
    return InvalidArgument("int_gemm: out must be float32 or bfloat16");
  }
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto od = out->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || od.size() != 2) {
    return InvalidArgument("int_gemm: a[M, K], b[N, K], out[M, N] must be rank 2");
  }
  const int64_t M = ad[0], K = ad[1], N = bd[0];
  if (bd[1] != K || od[0] != M || od[1] != N ||
      static_cast<int64_t>(row_scale.element_count()) != M || scale.element_count() != 1 ||
      static_cast<int64_t>(col_bias.element_count()) != N) {
    return InvalidArgument("int_gemm: shapes must be a[M, K], b[N, K], scale[], "
                           "row_scale[M], col_bias[N], out[M, N]");
  }
  GemmDesc d;
  d.a = reinterpret_cast<const int8_t*>(a.untyped_data());
  d.lda = K;
  d.b = reinterpret_cast<const int8_t*>(b.untyped_data());
  d.ldb = K;
  d.M = M;
  d.N = N;
  d.K = K;
  d.scale = reinterpret_cast<const float*>(scale.untyped_data());
  d.row_scale = reinterpret_cast<const float*>(row_scale.untyped_data());
  d.col_bias = reinterpret_cast<const float*>(col_bias.untyped_data());
  d.out = out->untyped_data();
  d.bf16 = bf16;
  d.int4 = int4 != 0;
  return RunGemm(stream, scratch, d);
}

}  // namespace
}  // namespace cuda
}  // namespace jint4

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    jint4_cuda_int_gemm, jint4::cuda::IntGemmImpl,
    xla::ffi::Ffi::Bind()
        .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
        .Ctx<xla::ffi::ScratchAllocator>()
        .Arg<xla::ffi::AnyBuffer>()     // a s8[M, K]
        .Arg<xla::ffi::AnyBuffer>()     // b s8[N, K]
        .Arg<xla::ffi::AnyBuffer>()     // scale f32[]
        .Arg<xla::ffi::AnyBuffer>()     // row_scale f32[M]
        .Arg<xla::ffi::AnyBuffer>()     // col_bias f32[N]
        .Ret<xla::ffi::AnyBuffer>()     // out f32 | bf16 [M, N]
        .Attr<int32_t>("int4"));
