// jint4's CPU XLA FFI handlers: bind the operands / results / attributes of
// the op contract (xla_ffi/README.md) in its order, validate shapes, dtypes
// and attributes with a clear ffi::Error, and call the plain kernels of
// kernels.h. Operands live in host memory on the CPU platform.
#include "cpu/handlers.h"

#include <cstdint>

#include "common/ffi_util.h"
#include "cpu/kernels.h"
#include "xla/ffi/api/ffi.h"

namespace jint4 {
namespace cpu {
namespace {

namespace ffi = ::xla::ffi;
using ffi_util::CheckElementCount;
using ffi_util::CheckLog2Block;
using ffi_util::CheckQuantRange;
using ffi_util::CheckRank;
using ffi_util::CheckResidual;
using ffi_util::CheckShape;
using ffi_util::NumElements;
using ffi_util::ShapeString;

// ---------------------------------------------------------------------------
// jint4_hadamard_quantize
//   x f32[M,K], step f32[], seed u32[2], log2_block s32[]
//   -> q s8[M,K], nibbles u8[P], flags u8[F,Q]; attrs qn, qp, with_residual
// ---------------------------------------------------------------------------
ffi::Error HadamardQuantizeImpl(ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> step,
                                ffi::Buffer<ffi::U32> seed,
                                ffi::Buffer<ffi::S32> log2_block,
                                ffi::ResultBuffer<ffi::S8> q,
                                ffi::ResultBuffer<ffi::U8> nibbles,
                                ffi::ResultBuffer<ffi::U8> flags, int32_t qn,
                                int32_t qp, int32_t with_residual) {
  constexpr const char* kOp = "jint4_hadamard_quantize";
  JINT4_RETURN_IF_ERROR(CheckQuantRange(qn, qp, kOp));
  JINT4_RETURN_IF_ERROR(CheckRank(x, 2, kOp, "x"));
  const int64_t m = x.dimensions()[0];
  const int64_t k = x.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckElementCount(step, 1, kOp, "step"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(seed, 2, kOp, "seed"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(log2_block, 1, kOp, "log2_block"));
  JINT4_RETURN_IF_ERROR(CheckShape(*q, {m, k}, kOp, "q"));
  const int32_t log2 = log2_block.typed_data()[0];
  JINT4_RETURN_IF_ERROR(CheckLog2Block(log2, k, kOp));
  if (with_residual != 0) {
    JINT4_RETURN_IF_ERROR(CheckResidual(*nibbles, *flags, m * k, qn, kOp));
  } else {
    JINT4_RETURN_IF_ERROR(CheckShape(*nibbles, {0}, kOp, "nibbles"));
    JINT4_RETURN_IF_ERROR(CheckRank(*flags, 2, kOp, "flags"));
    JINT4_CHECK_ARG(flags->dimensions()[1] == 0, kOp,
                    ": without residual, 'flags' must be u8[F, 0]; got ",
                    ShapeString(flags->dimensions()));
  }
  const uint32_t* s = seed.typed_data();
  HadamardQuantize(x.typed_data(), m, k, step.typed_data()[0], s[0], s[1],
                   log2, qn, qp, q->typed_data(),
                   with_residual ? nibbles->typed_data() : nullptr,
                   with_residual ? flags->typed_data() : nullptr);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_residual_values: nibbles u8[P], flags u8[F,Q] -> q s8[M,K]; qn, qp
// ---------------------------------------------------------------------------
ffi::Error ResidualValuesImpl(ffi::Buffer<ffi::U8> nibbles,
                              ffi::Buffer<ffi::U8> flags,
                              ffi::ResultBuffer<ffi::S8> q, int32_t qn,
                              int32_t qp) {
  constexpr const char* kOp = "jint4_residual_values";
  JINT4_RETURN_IF_ERROR(CheckQuantRange(qn, qp, kOp));
  JINT4_RETURN_IF_ERROR(CheckRank(*q, 2, kOp, "q"));
  const int64_t n = NumElements(q->dimensions());
  JINT4_RETURN_IF_ERROR(CheckResidual(nibbles, flags, n, qn, kOp));
  ResidualValues(nibbles.typed_data(), flags.typed_data(), n, qn, qp,
                 q->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_lsq_backward: grad f32[M,K], nibbles, flags
//   -> dt f32[M,K], delta_sum f32[]; qn, qp
// ---------------------------------------------------------------------------
ffi::Error LsqBackwardImpl(ffi::Buffer<ffi::F32> grad,
                           ffi::Buffer<ffi::U8> nibbles,
                           ffi::Buffer<ffi::U8> flags,
                           ffi::ResultBuffer<ffi::F32> dt,
                           ffi::ResultBuffer<ffi::F32> delta_sum, int32_t qn,
                           int32_t qp) {
  constexpr const char* kOp = "jint4_lsq_backward";
  JINT4_RETURN_IF_ERROR(CheckQuantRange(qn, qp, kOp));
  JINT4_RETURN_IF_ERROR(CheckRank(grad, 2, kOp, "grad"));
  const int64_t m = grad.dimensions()[0];
  const int64_t k = grad.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckResidual(nibbles, flags, m * k, qn, kOp));
  JINT4_RETURN_IF_ERROR(CheckShape(*dt, {m, k}, kOp, "dt"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(*delta_sum, 1, kOp, "delta_sum"));
  delta_sum->typed_data()[0] =
      LsqBackward(grad.typed_data(), nibbles.typed_data(), flags.typed_data(),
                  m * k, qn, qp, dt->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_bit_split: g f32[R,C], seed u32[2]
//   -> hi s8[R,C], lo s8[R,C], scales f32[2], hi_norm f32[R], lo_norm f32[R]
// ---------------------------------------------------------------------------
ffi::Error BitSplitImpl(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::U32> seed,
                        ffi::ResultBuffer<ffi::S8> hi,
                        ffi::ResultBuffer<ffi::S8> lo,
                        ffi::ResultBuffer<ffi::F32> scales,
                        ffi::ResultBuffer<ffi::F32> hi_norm,
                        ffi::ResultBuffer<ffi::F32> lo_norm) {
  constexpr const char* kOp = "jint4_bit_split";
  JINT4_RETURN_IF_ERROR(CheckRank(g, 2, kOp, "g"));
  const int64_t r = g.dimensions()[0];
  const int64_t c = g.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckElementCount(seed, 2, kOp, "seed"));
  JINT4_RETURN_IF_ERROR(CheckShape(*hi, {r, c}, kOp, "hi"));
  JINT4_RETURN_IF_ERROR(CheckShape(*lo, {r, c}, kOp, "lo"));
  JINT4_RETURN_IF_ERROR(CheckShape(*scales, {2}, kOp, "scales"));
  JINT4_RETURN_IF_ERROR(CheckShape(*hi_norm, {r}, kOp, "hi_norm"));
  JINT4_RETURN_IF_ERROR(CheckShape(*lo_norm, {r}, kOp, "lo_norm"));
  const uint32_t* s = seed.typed_data();
  BitSplit(g.typed_data(), r, c, s[0], s[1], hi->typed_data(),
           lo->typed_data(), scales->typed_data(), hi_norm->typed_data(),
           lo_norm->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_int_gemm: a s8[M,K], b s8[N,K], scale f32[], row_scale f32[M]
//   -> out f32 or bf16 [M,N]
// ---------------------------------------------------------------------------
ffi::Error IntGemmImpl(ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::S8> b,
                       ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> row_scale,
                       ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kOp = "jint4_int_gemm";
  JINT4_RETURN_IF_ERROR(CheckRank(a, 2, kOp, "a"));
  JINT4_RETURN_IF_ERROR(CheckRank(b, 2, kOp, "b"));
  const int64_t m = a.dimensions()[0];
  const int64_t k = a.dimensions()[1];
  const int64_t n = b.dimensions()[0];
  JINT4_CHECK_ARG(b.dimensions()[1] == k, kOp,
                  ": a[M,K] and b[N,K] must share K; got a ",
                  ShapeString(a.dimensions()), " and b ",
                  ShapeString(b.dimensions()));
  JINT4_RETURN_IF_ERROR(CheckElementCount(scale, 1, kOp, "scale"));
  JINT4_RETURN_IF_ERROR(CheckShape(row_scale, {m}, kOp, "row_scale"));
  JINT4_RETURN_IF_ERROR(CheckShape(*out, {m, n}, kOp, "out"));
  const float s = scale.typed_data()[0];
  switch (out->element_type()) {
    case ffi::DataType::F32:
      IntGemmF32(a.typed_data(), b.typed_data(), m, n, k, s,
                 row_scale.typed_data(),
                 static_cast<float*>(out->untyped_data()));
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      IntGemmBF16(a.typed_data(), b.typed_data(), m, n, k, s,
                  row_scale.typed_data(),
                  static_cast<uint16_t*>(out->untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(ffi_util::StrCat(
          kOp, ": result 'out' must be f32 or bf16; got ",
          ffi_util::DataTypeName(out->element_type())));
  }
}

// ---------------------------------------------------------------------------
// jint4_int_gemm_gather_rows: a s8[R,M], b s8[T,N], rows s32[R], scale f32[]
//   -> out f32[M,N]
// ---------------------------------------------------------------------------
ffi::Error IntGemmGatherRowsImpl(ffi::Buffer<ffi::S8> a,
                                 ffi::Buffer<ffi::S8> b,
                                 ffi::Buffer<ffi::S32> rows,
                                 ffi::Buffer<ffi::F32> scale,
                                 ffi::ResultBuffer<ffi::F32> out) {
  constexpr const char* kOp = "jint4_int_gemm_gather_rows";
  JINT4_RETURN_IF_ERROR(CheckRank(a, 2, kOp, "a"));
  JINT4_RETURN_IF_ERROR(CheckRank(b, 2, kOp, "b"));
  const int64_t r = a.dimensions()[0];
  const int64_t m = a.dimensions()[1];
  const int64_t t = b.dimensions()[0];
  const int64_t n = b.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckShape(rows, {r}, kOp, "rows"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(scale, 1, kOp, "scale"));
  JINT4_RETURN_IF_ERROR(CheckShape(*out, {m, n}, kOp, "out"));
  const int32_t* rw = rows.typed_data();
  for (int64_t i = 0; i < r; ++i) {
    JINT4_CHECK_ARG(rw[i] >= 0 && rw[i] < t, kOp, ": rows[", i, "] = ", rw[i],
                    " is out of range [0, ", t, ") of b's ", t, " rows");
  }
  IntGemmGatherRowsF32(a.typed_data(), b.typed_data(), rw, r, m, n,
                       scale.typed_data()[0], out->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace cpu
}  // namespace jint4

namespace ffi = ::xla::ffi;

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_hadamard_quantize,
                              jint4::cpu::HadamardQuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // step
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seed
                                  .Arg<ffi::Buffer<ffi::S32>>()  // log2_block
                                  .Ret<ffi::Buffer<ffi::S8>>()   // q
                                  .Ret<ffi::Buffer<ffi::U8>>()   // nibbles
                                  .Ret<ffi::Buffer<ffi::U8>>()   // flags
                                  .Attr<int32_t>("qn")
                                  .Attr<int32_t>("qp")
                                  .Attr<int32_t>("with_residual"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_residual_values,
                              jint4::cpu::ResidualValuesImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()  // nibbles
                                  .Arg<ffi::Buffer<ffi::U8>>()  // flags
                                  .Ret<ffi::Buffer<ffi::S8>>()  // q
                                  .Attr<int32_t>("qn")
                                  .Attr<int32_t>("qp"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_lsq_backward,
                              jint4::cpu::LsqBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad
                                  .Arg<ffi::Buffer<ffi::U8>>()   // nibbles
                                  .Arg<ffi::Buffer<ffi::U8>>()   // flags
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dt
                                  .Ret<ffi::Buffer<ffi::F32>>()  // delta_sum
                                  .Attr<int32_t>("qn")
                                  .Attr<int32_t>("qp"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_bit_split, jint4::cpu::BitSplitImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seed
                                  .Ret<ffi::Buffer<ffi::S8>>()   // hi
                                  .Ret<ffi::Buffer<ffi::S8>>()   // lo
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scales
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hi_norm
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lo_norm

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_int_gemm, jint4::cpu::IntGemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // a
                                  .Arg<ffi::Buffer<ffi::S8>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // row_scale
                                  .Ret<ffi::AnyBuffer>());       // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_int_gemm_gather_rows,
                              jint4::cpu::IntGemmGatherRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // a
                                  .Arg<ffi::Buffer<ffi::S8>>()   // b
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

#pragma GCC visibility pop
