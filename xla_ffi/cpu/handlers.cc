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
using ffi_util::CheckFlagAttr;
using ffi_util::CheckFloatType;
using ffi_util::CheckIndices;
using ffi_util::CheckLog2Block;
using ffi_util::CheckOptionalRows;
using ffi_util::CheckQuantRange;
using ffi_util::CheckRank;
using ffi_util::CheckResidual;
using ffi_util::CheckShape;
using ffi_util::DataTypeName;
using ffi_util::NumElements;
using ffi_util::ShapeString;

// The kernels' FloatType of a buffer whose type CheckFloatType accepted.
FloatType FloatTypeOf(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return FloatType::kBF16;
    case ffi::DataType::F16: return FloatType::kF16;
    default: return FloatType::kF32;
  }
}

// ---------------------------------------------------------------------------
// jint4_hadamard_quantize
//   x (f32|bf16|f16)[R,S], step f32[], seed u32[2], log2_block s32[]
//   -> q s8[R,S] or [S,R], nibbles u8[P], flags u8[F,Q], norms f32[R or 0]
//   attrs qn, qp, with_residual, axis, transpose, log2_hint (the static
//   log2 block or -1: a CUDA tiling hint, only validated here)
// ---------------------------------------------------------------------------
ffi::Error HadamardQuantizeImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> step,
                                ffi::Buffer<ffi::U32> seed,
                                ffi::Buffer<ffi::S32> log2_block,
                                ffi::ResultBuffer<ffi::S8> q,
                                ffi::ResultBuffer<ffi::U8> nibbles,
                                ffi::ResultBuffer<ffi::U8> flags,
                                ffi::ResultBuffer<ffi::F32> norms, int32_t qn,
                                int32_t qp, int32_t with_residual, int32_t axis,
                                int32_t transpose, int32_t log2_hint) {
  constexpr const char* kOp = "jint4_hadamard_quantize";
  JINT4_RETURN_IF_ERROR(CheckQuantRange(qn, qp, kOp));
  JINT4_RETURN_IF_ERROR(CheckFlagAttr(with_residual, kOp, "with_residual"));
  JINT4_CHECK_ARG(log2_hint >= -1 && log2_hint <= 10, kOp,
                  ": attribute 'log2_hint' must be -1 or a log2 block in [0, 10]; got ",
                  log2_hint);
  JINT4_RETURN_IF_ERROR(CheckFlagAttr(transpose, kOp, "transpose"));
  JINT4_CHECK_ARG(axis == 0 || axis == 1, kOp,
                  ": attribute 'axis' must be 0 (Hadamard down the columns) or"
                  " 1 (along the rows); got ", axis);
  JINT4_CHECK_ARG(with_residual == 0 || (axis == 1 && transpose == 0), kOp,
                  ": a residual (with_residual=1) is kept only for axis=1"
                  " without transpose (activations); got axis=", axis,
                  ", transpose=", transpose,
                  ". Quantize without a residual, or along axis 1");
  JINT4_RETURN_IF_ERROR(CheckFloatType(x, kOp, "x"));
  JINT4_RETURN_IF_ERROR(CheckRank(x, 2, kOp, "x"));
  const int64_t r = x.dimensions()[0];
  const int64_t s = x.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckElementCount(step, 1, kOp, "step"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(seed, 2, kOp, "seed"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(log2_block, 1, kOp, "log2_block"));
  if (transpose != 0) {
    JINT4_RETURN_IF_ERROR(CheckShape(*q, {s, r}, kOp, "q"));
  } else {
    JINT4_RETURN_IF_ERROR(CheckShape(*q, {r, s}, kOp, "q"));
  }
  const int32_t log2 = log2_block.typed_data()[0];
  JINT4_RETURN_IF_ERROR(CheckLog2Block(
      log2, axis == 1 ? s : r,
      axis == 1 ? "dim 1 of x (axis=1)" : "dim 0 of x (axis=0)", kOp));
  if (with_residual != 0) {
    JINT4_RETURN_IF_ERROR(CheckResidual(*nibbles, *flags, r * s, qn, kOp));
    JINT4_RETURN_IF_ERROR(CheckShape(*norms, {r}, kOp, "norms"));
  } else {
    JINT4_RETURN_IF_ERROR(CheckShape(*nibbles, {0}, kOp, "nibbles"));
    JINT4_RETURN_IF_ERROR(CheckRank(*flags, 2, kOp, "flags"));
    JINT4_CHECK_ARG(flags->dimensions()[1] == 0, kOp,
                    ": without residual, 'flags' must be u8[F, 0]; got ",
                    ShapeString(flags->dimensions()));
    JINT4_RETURN_IF_ERROR(CheckShape(*norms, {0}, kOp, "norms"));
  }
  const uint32_t* sd = seed.typed_data();
  const bool res = with_residual != 0;
  HadamardQuantize(x.untyped_data(), FloatTypeOf(x.element_type()), r, s,
                   step.typed_data()[0], sd[0], sd[1], log2, qn, qp, axis,
                   transpose != 0, q->typed_data(),
                   res ? nibbles->typed_data() : nullptr,
                   res ? flags->typed_data() : nullptr,
                   res ? norms->typed_data() : nullptr);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_hadamard_quantize_weight
//   x (f32|bf16|f16)[R,S], step f32[], log2_block s32[]
//   -> q_t s8[S,R], q s8[R,S], col_poison f32[S]; attrs qn, qp, log2_hint
//   Both layouts of the axis-0 codes (the forward and the dX GEMM operands
//   of a kernel[D, C]): two HadamardQuantize calls here (this handler is the
//   tested twin; the CUDA one makes one pass), and the column poison (NaN
//   where a column holds a NaN or Inf, else 0: the GEMM's column bias).
// ---------------------------------------------------------------------------
ffi::Error HadamardQuantizeWeightImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> step,
                                      ffi::Buffer<ffi::S32> log2_block,
                                      ffi::ResultBuffer<ffi::S8> q_t,
                                      ffi::ResultBuffer<ffi::S8> q,
                                      ffi::ResultBuffer<ffi::F32> col_poison, int32_t qn,
                                      int32_t qp, int32_t log2_hint) {
  constexpr const char* kOp = "jint4_hadamard_quantize_weight";
  JINT4_RETURN_IF_ERROR(CheckQuantRange(qn, qp, kOp));
  JINT4_CHECK_ARG(log2_hint >= -1 && log2_hint <= 10, kOp,
                  ": attribute 'log2_hint' must be -1 or a log2 block in [0, 10]; got ",
                  log2_hint);
  JINT4_RETURN_IF_ERROR(CheckFloatType(x, kOp, "x"));
  JINT4_RETURN_IF_ERROR(CheckRank(x, 2, kOp, "x"));
  const int64_t r = x.dimensions()[0];
  const int64_t s = x.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckElementCount(step, 1, kOp, "step"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(log2_block, 1, kOp, "log2_block"));
  JINT4_RETURN_IF_ERROR(CheckShape(*q_t, {s, r}, kOp, "q_t"));
  JINT4_RETURN_IF_ERROR(CheckShape(*q, {r, s}, kOp, "q"));
  JINT4_RETURN_IF_ERROR(CheckShape(*col_poison, {s}, kOp, "col_poison"));
  const int32_t log2 = log2_block.typed_data()[0];
  JINT4_RETURN_IF_ERROR(CheckLog2Block(log2, r, "dim 0 of x", kOp));
  for (int transpose = 0; transpose < 2; ++transpose) {
    HadamardQuantize(x.untyped_data(), FloatTypeOf(x.element_type()), r, s,
                     step.typed_data()[0], 0u, 0u, log2, qn, qp, /*axis=*/0,
                     transpose != 0, transpose ? q_t->typed_data() : q->typed_data(),
                     nullptr, nullptr, nullptr);
  }
  ColumnPoison(x.untyped_data(), FloatTypeOf(x.element_type()), r, s,
               col_poison->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_residual_values: nibbles u8[P], flags u8[F,Q], rows s32[T or 0]
//   -> q s8[T,K] or [K,T]; attrs qn, qp, m, gather, transpose
// ---------------------------------------------------------------------------
ffi::Error ResidualValuesImpl(ffi::Buffer<ffi::U8> nibbles,
                              ffi::Buffer<ffi::U8> flags,
                              ffi::Buffer<ffi::S32> rows,
                              ffi::ResultBuffer<ffi::S8> q, int32_t qn,
                              int32_t qp, int32_t m, int32_t gather,
                              int32_t transpose) {
  constexpr const char* kOp = "jint4_residual_values";
  JINT4_RETURN_IF_ERROR(CheckQuantRange(qn, qp, kOp));
  JINT4_RETURN_IF_ERROR(CheckFlagAttr(gather, kOp, "gather"));
  JINT4_RETURN_IF_ERROR(CheckFlagAttr(transpose, kOp, "transpose"));
  JINT4_CHECK_ARG(m >= 0, kOp, ": attribute 'm' (rows of the quantized tensor)"
                  " must be >= 0; got ", m);
  JINT4_RETURN_IF_ERROR(CheckRank(*q, 2, kOp, "q"));
  JINT4_RETURN_IF_ERROR(CheckRank(rows, 1, kOp, "rows"));
  const int64_t t = q->dimensions()[transpose != 0 ? 1 : 0];
  const int64_t k = q->dimensions()[transpose != 0 ? 0 : 1];
  if (gather != 0) {
    JINT4_CHECK_ARG(rows.dimensions()[0] == t, kOp, ": with gather=1, 'rows'"
                    " must be s32[T] with T = ", t, " rows of the result q ",
                    ShapeString(q->dimensions()), (transpose ? " ([K, T])" : " ([T, K])"),
                    "; got rows ", ShapeString(rows.dimensions()));
  } else {
    JINT4_RETURN_IF_ERROR(CheckShape(rows, {0}, kOp, "rows (gather=0)"));
    JINT4_CHECK_ARG(t == m, kOp, ": with gather=0 the result q ",
                    ShapeString(q->dimensions()), " must hold all m = ", m,
                    " rows", (transpose ? " ([K, m])" : " ([m, K])"));
  }
  const int64_t n = int64_t{m} * k;
  JINT4_CHECK_ARG(
      nibbles.dimensions().size() == 1 &&
          nibbles.dimensions()[0] == ffi_util::NibbleBytes(n),
      kOp, ": 'nibbles' ", ShapeString(nibbles.dimensions()),
      " is not the residual of an [m, K] = [", m, ", ", k, "] tensor (", n,
      " elements need u8[", ffi_util::NibbleBytes(n),
      "]); pass the shape the residual was quantized with");
  JINT4_RETURN_IF_ERROR(CheckResidual(nibbles, flags, n, qn, kOp));
  const int32_t* rw = gather != 0 ? rows.typed_data() : nullptr;
  if (rw != nullptr) {
    JINT4_RETURN_IF_ERROR(CheckIndices(rw, t, m, /*allow_negative=*/false,
                                       kOp, "rows", "rows of the residual"));
  }
  ResidualValues(nibbles.typed_data(), flags.typed_data(), m, k, rw, t,
                 transpose != 0, qn, qp, q->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_lsq_backward: grad (f32|bf16|f16)[S,K], nibbles, flags, slots s32[2,M] (or
//   [2,0]), log2_block s32[] -> dt (f32|bf16|f16)[M,K], delta_sum f32[]
//   attrs qn, qp, gather
// ---------------------------------------------------------------------------
ffi::Error LsqBackwardImpl(ffi::AnyBuffer grad,
                           ffi::Buffer<ffi::U8> nibbles,
                           ffi::Buffer<ffi::U8> flags,
                           ffi::Buffer<ffi::S32> slots,
                           ffi::Buffer<ffi::S32> log2_block,
                           ffi::Result<ffi::AnyBuffer> dt,
                           ffi::ResultBuffer<ffi::F32> delta_sum, int32_t qn,
                           int32_t qp, int32_t gather) {
  constexpr const char* kOp = "jint4_lsq_backward";
  JINT4_RETURN_IF_ERROR(CheckQuantRange(qn, qp, kOp));
  JINT4_RETURN_IF_ERROR(CheckFlagAttr(gather, kOp, "gather"));
  JINT4_RETURN_IF_ERROR(CheckFloatType(grad, kOp, "grad"));
  JINT4_RETURN_IF_ERROR(CheckRank(grad, 2, kOp, "grad"));
  const int64_t s = grad.dimensions()[0];
  const int64_t k = grad.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckRank(slots, 2, kOp, "slots"));
  JINT4_CHECK_ARG(slots.dimensions()[0] == 2, kOp,
                  ": 'slots' must be s32[2, M] (s32[2, 0] with gather=0); got ",
                  ShapeString(slots.dimensions()));
  int64_t m = s;
  if (gather != 0) {
    m = slots.dimensions()[1];
  } else {
    JINT4_RETURN_IF_ERROR(CheckShape(slots, {2, 0}, kOp, "slots (gather=0)"));
  }
  JINT4_RETURN_IF_ERROR(CheckElementCount(log2_block, 1, kOp, "log2_block"));
  const int32_t log2 = log2_block.typed_data()[0];
  JINT4_RETURN_IF_ERROR(CheckLog2Block(log2, k, kOp));
  JINT4_RETURN_IF_ERROR(CheckResidual(nibbles, flags, m * k, qn, kOp));
  JINT4_RETURN_IF_ERROR(CheckFloatType(*dt, kOp, "dt"));
  JINT4_RETURN_IF_ERROR(CheckShape(*dt, {m, k}, kOp, "dt"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(*delta_sum, 1, kOp, "delta_sum"));
  const int32_t* sl = gather != 0 ? slots.typed_data() : nullptr;
  if (sl != nullptr) {
    JINT4_RETURN_IF_ERROR(CheckIndices(sl, m, s, /*allow_negative=*/true, kOp,
                                       "slots[0]", "rows of grad"));
    JINT4_RETURN_IF_ERROR(CheckIndices(sl + m, m, s, /*allow_negative=*/true,
                                       kOp, "slots[1]", "rows of grad"));
  }
  delta_sum->typed_data()[0] =
      LsqBackward(grad.untyped_data(), FloatTypeOf(grad.element_type()), s, k, sl, m,
                  nibbles.typed_data(),
                  flags.typed_data(), qn, qp, log2,
                  FloatTypeOf(dt->element_type()), dt->untyped_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_lsq_weight_backward: grad (f32|bf16)[D,C], kernel (f32|bf16|f16)[D,C],
//   step f32[], log2_block s32[] -> dk (f32|bf16|f16)[D,C], delta_sum f32[]
//   attrs qn, qp, log2_hint (the static log2 block or -1: a CUDA tiling hint,
//   only validated here)
// ---------------------------------------------------------------------------
ffi::Error LsqWeightBackwardImpl(ffi::AnyBuffer grad,
                                 ffi::AnyBuffer kernel,
                                 ffi::Buffer<ffi::F32> step,
                                 ffi::Buffer<ffi::S32> log2_block,
                                 ffi::Result<ffi::AnyBuffer> dk,
                                 ffi::ResultBuffer<ffi::F32> delta_sum,
                                 int32_t qn, int32_t qp, int32_t log2_hint) {
  constexpr const char* kOp = "jint4_lsq_weight_backward";
  JINT4_RETURN_IF_ERROR(CheckQuantRange(qn, qp, kOp));
  JINT4_CHECK_ARG(log2_hint >= -1 && log2_hint <= ffi_util::kMaxLog2Block, kOp,
                  ": attribute 'log2_hint' must be -1 or a log2 block in [0, ",
                  ffi_util::kMaxLog2Block, "]; got ", log2_hint);
  JINT4_RETURN_IF_ERROR(CheckFloatType(kernel, kOp, "kernel"));
  JINT4_RETURN_IF_ERROR(CheckRank(kernel, 2, kOp, "kernel"));
  JINT4_CHECK_ARG(grad.element_type() == ffi::DataType::F32 ||
                      grad.element_type() == ffi::DataType::BF16,
                  kOp, ": 'grad' must be float32 or bfloat16; got ",
                  DataTypeName(grad.element_type()), ". Cast it with grad.astype(jnp.float32).");
  const int64_t d = kernel.dimensions()[0];
  const int64_t c = kernel.dimensions()[1];
  JINT4_CHECK_ARG(grad.dimensions().size() == 2 && grad.dimensions()[0] == d &&
                      grad.dimensions()[1] == c,
                  kOp, ": 'grad' must have the kernel's shape [D, C] = ",
                  ShapeString(kernel.dimensions()), "; got ",
                  ShapeString(grad.dimensions()));
  JINT4_RETURN_IF_ERROR(CheckElementCount(step, 1, kOp, "step"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(log2_block, 1, kOp, "log2_block"));
  JINT4_RETURN_IF_ERROR(CheckFloatType(*dk, kOp, "dk"));
  JINT4_RETURN_IF_ERROR(CheckShape(*dk, {d, c}, kOp, "dk"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(*delta_sum, 1, kOp, "delta_sum"));
  const int32_t log2 = log2_block.typed_data()[0];
  JINT4_RETURN_IF_ERROR(
      CheckLog2Block(log2, d, "dim 0 of kernel (D, Hb down the columns)", kOp));
  delta_sum->typed_data()[0] = LsqWeightBackward(
      grad.untyped_data(), FloatTypeOf(grad.element_type()), kernel.untyped_data(),
      FloatTypeOf(kernel.element_type()), d, c, step.typed_data()[0], qn, qp,
      log2, FloatTypeOf(dk->element_type()), dk->untyped_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_bit_split: g (f32|bf16|f16)[R,C], seed u32[2], abs_max f32[] or
//   f32[0], row_inv f32[R] or f32[0] -> g2 s8[2R,C], scales f32[2],
//   norms f32[2R]
//   abs_max: the caller's max|g| (used as given), or empty: computed here.
//   row_inv: the rows g[i, :] * row_inv[i] are split in g's place.
// ---------------------------------------------------------------------------
ffi::Error BitSplitImpl(ffi::AnyBuffer g, ffi::Buffer<ffi::U32> seed,
                        ffi::Buffer<ffi::F32> abs_max,
                        ffi::Buffer<ffi::F32> row_inv,
                        ffi::ResultBuffer<ffi::S8> g2,
                        ffi::ResultBuffer<ffi::F32> scales,
                        ffi::ResultBuffer<ffi::F32> norms) {
  constexpr const char* kOp = "jint4_bit_split";
  JINT4_RETURN_IF_ERROR(CheckFloatType(g, kOp, "g"));
  JINT4_RETURN_IF_ERROR(CheckRank(g, 2, kOp, "g"));
  const int64_t r = g.dimensions()[0];
  const int64_t c = g.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckElementCount(seed, 2, kOp, "seed"));
  JINT4_RETURN_IF_ERROR(CheckShape(*g2, {2 * r, c}, kOp, "g2"));
  JINT4_RETURN_IF_ERROR(CheckShape(*scales, {2}, kOp, "scales"));
  JINT4_RETURN_IF_ERROR(CheckShape(*norms, {2 * r}, kOp, "norms"));
  JINT4_CHECK_ARG(abs_max.element_count() <= 1, kOp, ": 'abs_max' must be f32[] (max|g|)"
                  " or empty; got ", ShapeString(abs_max.dimensions()));
  JINT4_RETURN_IF_ERROR(CheckOptionalRows(row_inv, r, kOp, "row_inv"));
  const uint32_t* sd = seed.typed_data();
  BitSplit(g.untyped_data(), FloatTypeOf(g.element_type()), r, c, sd[0], sd[1],
           g2->typed_data(), scales->typed_data(), norms->typed_data(),
           abs_max.element_count() == 1 ? abs_max.typed_data() : nullptr,
           row_inv.element_count() > 0 ? row_inv.typed_data() : nullptr);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_bit_split_joined: g (f32|bf16|f16)[R,C], seed u32[2], abs_max f32[]
//   or f32[0], row_inv f32[R] or f32[0] -> v s8[R,C], vt s8[C,R], scales f32[2]
//   abs_max: the caller's max|g| (used as given), or empty: computed here.
//   row_inv: v is the split of the unit rows g[i, :] * row_inv[i] with m = 1.
// ---------------------------------------------------------------------------
ffi::Error BitSplitJoinedImpl(ffi::AnyBuffer g, ffi::Buffer<ffi::U32> seed,
                              ffi::Buffer<ffi::F32> abs_max,
                              ffi::Buffer<ffi::F32> row_inv,
                              ffi::ResultBuffer<ffi::S8> v,
                              ffi::ResultBuffer<ffi::S8> vt,
                              ffi::ResultBuffer<ffi::F32> scales) {
  constexpr const char* kOp = "jint4_bit_split_joined";
  JINT4_RETURN_IF_ERROR(CheckFloatType(g, kOp, "g"));
  JINT4_RETURN_IF_ERROR(CheckRank(g, 2, kOp, "g"));
  const int64_t r = g.dimensions()[0];
  const int64_t c = g.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckElementCount(seed, 2, kOp, "seed"));
  JINT4_RETURN_IF_ERROR(CheckShape(*v, {r, c}, kOp, "v"));
  JINT4_RETURN_IF_ERROR(CheckShape(*vt, {c, r}, kOp, "vt"));
  JINT4_RETURN_IF_ERROR(CheckShape(*scales, {2}, kOp, "scales"));
  JINT4_CHECK_ARG(abs_max.element_count() <= 1, kOp, ": 'abs_max' must be f32[] (max|g|)"
                  " or empty; got ", ShapeString(abs_max.dimensions()));
  JINT4_RETURN_IF_ERROR(CheckOptionalRows(row_inv, r, kOp, "row_inv"));
  const uint32_t* sd = seed.typed_data();
  BitSplitJoined(g.untyped_data(), FloatTypeOf(g.element_type()), r, c, sd[0],
                 sd[1], v->typed_data(), vt->typed_data(), scales->typed_data(),
                 abs_max.element_count() == 1 ? abs_max.typed_data() : nullptr,
                 row_inv.element_count() > 0 ? row_inv.typed_data() : nullptr);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_resplit_rows: g2 s8[R2,C], rows s32[J], row_scale f32[J], seed u32[2]
//   -> vt s8[C,J], scales f32[2]
// ---------------------------------------------------------------------------
ffi::Error ResplitRowsImpl(ffi::Buffer<ffi::S8> g2, ffi::Buffer<ffi::S32> rows,
                           ffi::Buffer<ffi::F32> row_scale,
                           ffi::Buffer<ffi::U32> seed,
                           ffi::ResultBuffer<ffi::S8> vt,
                           ffi::ResultBuffer<ffi::F32> scales) {
  constexpr const char* kOp = "jint4_resplit_rows";
  JINT4_RETURN_IF_ERROR(CheckRank(g2, 2, kOp, "g2"));
  const int64_t r2 = g2.dimensions()[0];
  const int64_t c = g2.dimensions()[1];
  JINT4_RETURN_IF_ERROR(CheckRank(rows, 1, kOp, "rows"));
  const int64_t j = rows.dimensions()[0];
  JINT4_RETURN_IF_ERROR(CheckShape(row_scale, {j}, kOp, "row_scale"));
  JINT4_RETURN_IF_ERROR(CheckElementCount(seed, 2, kOp, "seed"));
  JINT4_RETURN_IF_ERROR(CheckShape(*vt, {c, j}, kOp, "vt"));
  JINT4_RETURN_IF_ERROR(CheckShape(*scales, {2}, kOp, "scales"));
  JINT4_RETURN_IF_ERROR(CheckIndices(rows.typed_data(), j, r2,
                                     /*allow_negative=*/false, kOp, "rows",
                                     "rows of g2"));
  const uint32_t* sd = seed.typed_data();
  ResplitRows(g2.typed_data(), c, rows.typed_data(), row_scale.typed_data(), j,
              sd[0], sd[1], vt->typed_data(), scales->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// jint4_int_gemm: a s8[M,K], b s8[N,K], scale f32[], row_scale f32[M],
//   col_bias f32[N] -> out f32 or bf16 [M,N]; attr int4
// ---------------------------------------------------------------------------
ffi::Error IntGemmImpl(ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::S8> b,
                       ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> row_scale,
                       ffi::Buffer<ffi::F32> col_bias,
                       ffi::Result<ffi::AnyBuffer> out, int32_t int4) {
  constexpr const char* kOp = "jint4_int_gemm";
  // int4 = 1 promises values in [-8, 7] (for INT4 tensor cores); the CPU
  // product is exact for any int8 either way.
  JINT4_RETURN_IF_ERROR(CheckFlagAttr(int4, kOp, "int4"));
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
  JINT4_RETURN_IF_ERROR(CheckShape(col_bias, {n}, kOp, "col_bias"));
  JINT4_RETURN_IF_ERROR(CheckShape(*out, {m, n}, kOp, "out"));
  const float s = scale.typed_data()[0];
  switch (out->element_type()) {
    case ffi::DataType::F32:
      IntGemmF32(a.typed_data(), b.typed_data(), m, n, k, s,
                 row_scale.typed_data(), col_bias.typed_data(),
                 static_cast<float*>(out->untyped_data()));
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      IntGemmBF16(a.typed_data(), b.typed_data(), m, n, k, s,
                  row_scale.typed_data(), col_bias.typed_data(),
                  static_cast<uint16_t*>(out->untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(ffi_util::StrCat(
          kOp, ": result 'out' must be f32 or bf16; got ",
          ffi_util::DataTypeName(out->element_type())));
  }
}

}  // namespace
}  // namespace cpu
}  // namespace jint4

namespace ffi = ::xla::ffi;

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_hadamard_quantize,
                              jint4::cpu::HadamardQuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // step
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seed
                                  .Arg<ffi::Buffer<ffi::S32>>()  // log2_block
                                  .Ret<ffi::Buffer<ffi::S8>>()   // q
                                  .Ret<ffi::Buffer<ffi::U8>>()   // nibbles
                                  .Ret<ffi::Buffer<ffi::U8>>()   // flags
                                  .Ret<ffi::Buffer<ffi::F32>>()  // norms
                                  .Attr<int32_t>("qn")
                                  .Attr<int32_t>("qp")
                                  .Attr<int32_t>("with_residual")
                                  .Attr<int32_t>("axis")
                                  .Attr<int32_t>("transpose")
                                  .Attr<int32_t>("log2_hint"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_hadamard_quantize_weight,
                              jint4::cpu::HadamardQuantizeWeightImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // step
                                  .Arg<ffi::Buffer<ffi::S32>>()  // log2_block
                                  .Ret<ffi::Buffer<ffi::S8>>()   // q_t
                                  .Ret<ffi::Buffer<ffi::S8>>()   // q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // col_poison
                                  .Attr<int32_t>("qn")
                                  .Attr<int32_t>("qp")
                                  .Attr<int32_t>("log2_hint"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_residual_values,
                              jint4::cpu::ResidualValuesImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // nibbles
                                  .Arg<ffi::Buffer<ffi::U8>>()   // flags
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows
                                  .Ret<ffi::Buffer<ffi::S8>>()   // q
                                  .Attr<int32_t>("qn")
                                  .Attr<int32_t>("qp")
                                  .Attr<int32_t>("m")
                                  .Attr<int32_t>("gather")
                                  .Attr<int32_t>("transpose"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_lsq_backward,
                              jint4::cpu::LsqBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // grad f32 / bf16 / f16
                                  .Arg<ffi::Buffer<ffi::U8>>()   // nibbles
                                  .Arg<ffi::Buffer<ffi::U8>>()   // flags
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Arg<ffi::Buffer<ffi::S32>>()  // log2_block
                                  .Ret<ffi::AnyBuffer>()         // dt
                                  .Ret<ffi::Buffer<ffi::F32>>()  // delta_sum
                                  .Attr<int32_t>("qn")
                                  .Attr<int32_t>("qp")
                                  .Attr<int32_t>("gather"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_lsq_weight_backward,
                              jint4::cpu::LsqWeightBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // grad
                                  .Arg<ffi::AnyBuffer>()         // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // step
                                  .Arg<ffi::Buffer<ffi::S32>>()  // log2_block
                                  .Ret<ffi::AnyBuffer>()         // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // delta_sum
                                  .Attr<int32_t>("qn")
                                  .Attr<int32_t>("qp")
                                  .Attr<int32_t>("log2_hint"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_bit_split, jint4::cpu::BitSplitImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()           // g
                                  .Arg<ffi::Buffer<ffi::U32>>()    // seed
                                  .Arg<ffi::Buffer<ffi::F32>>()    // abs_max
                                  .Arg<ffi::Buffer<ffi::F32>>()    // row_inv
                                  .Ret<ffi::Buffer<ffi::S8>>()     // g2
                                  .Ret<ffi::Buffer<ffi::F32>>()    // scales
                                  .Ret<ffi::Buffer<ffi::F32>>());  // norms

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_bit_split_joined,
                              jint4::cpu::BitSplitJoinedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()           // g
                                  .Arg<ffi::Buffer<ffi::U32>>()    // seed
                                  .Arg<ffi::Buffer<ffi::F32>>()    // abs_max
                                  .Arg<ffi::Buffer<ffi::F32>>()    // row_inv
                                  .Ret<ffi::Buffer<ffi::S8>>()     // v
                                  .Ret<ffi::Buffer<ffi::S8>>()     // vt
                                  .Ret<ffi::Buffer<ffi::F32>>());  // scales

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_resplit_rows,
                              jint4::cpu::ResplitRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()     // g2
                                  .Arg<ffi::Buffer<ffi::S32>>()    // rows
                                  .Arg<ffi::Buffer<ffi::F32>>()    // row_scale
                                  .Arg<ffi::Buffer<ffi::U32>>()    // seed
                                  .Ret<ffi::Buffer<ffi::S8>>()     // vt
                                  .Ret<ffi::Buffer<ffi::F32>>());  // scales

XLA_FFI_DEFINE_HANDLER_SYMBOL(jint4_cpu_int_gemm, jint4::cpu::IntGemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // a
                                  .Arg<ffi::Buffer<ffi::S8>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // row_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // col_bias
                                  .Ret<ffi::AnyBuffer>()         // out
                                  .Attr<int32_t>("int4"));

#pragma GCC visibility pop
