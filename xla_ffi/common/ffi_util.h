// Small helpers shared by jint4's CPU and CUDA FFI handlers: shape / dtype /
// attribute validation that returns a clear `ffi::Error`, and the sizes of the
// packed residual of the op contract (xla_ffi/README.md).
//
// Host-only C++17 on top of XLA's FFI header; no CUDA, so both cpu/ and cuda/
// (nvcc host code) can include it.
#ifndef JINT4_XLA_FFI_COMMON_FFI_UTIL_H_
#define JINT4_XLA_FFI_COMMON_FFI_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jint4 {
namespace ffi_util {

namespace ffi = ::xla::ffi;

// Largest Hadamard block handled: 2^10 = 1024, as jint4.quant.hadamard's
// MAX_LOG2_BLOCK and jint4.config's MAX_HADAMARD_BLOCK.
constexpr int kMaxLog2Block = 10;

// Returns `expr` (an ffi::Error) from the enclosing function if it failed.
#define JINT4_RETURN_IF_ERROR(expr)                        \
  do {                                                     \
    ::xla::ffi::Error jint4_error_ = (expr);               \
    if (jint4_error_.failure()) return jint4_error_;       \
  } while (0)

// Returns ffi::Error::InvalidArgument(StrCat(...)) unless `cond` holds.
#define JINT4_CHECK_ARG(cond, ...)                                          \
  do {                                                                      \
    if (!(cond)) {                                                          \
      return ::xla::ffi::Error::InvalidArgument(                            \
          ::jint4::ffi_util::StrCat(__VA_ARGS__));                          \
    }                                                                       \
  } while (0)

// Appends one piece of an error message. Plain string appends and
// std::to_string, no iostreams: with jaxlib 0.11.2 on a CUDA host an
// ostringstream in this error path took the process down, while string
// concatenation (the CUDA handlers' messages) raised cleanly.
inline void AppendPiece(std::string* out, const std::string& v) { out->append(v); }
inline void AppendPiece(std::string* out, const char* v) { out->append(v); }
inline void AppendPiece(std::string* out, char v) { out->push_back(v); }
inline void AppendPiece(std::string* out, bool v) { out->append(v ? "true" : "false"); }
template <typename T>
void AppendPiece(std::string* out, const T& v) {
  static_assert(std::is_arithmetic<T>::value, "StrCat takes strings and numbers");
  out->append(std::to_string(v));
}

// Concatenates strings and numbers.
template <typename... Args>
std::string StrCat(const Args&... args) {
  std::string out;
  (void)std::initializer_list<int>{(AppendPiece(&out, args), 0)...};
  return out;
}

inline ffi::Error InvalidArgument(const std::string& message) {
  return ffi::Error::InvalidArgument(message);
}

// Dimension helpers (dims as returned by Buffer/AnyBuffer::dimensions()).
template <typename Dims>
int64_t NumElements(const Dims& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::string out = "[";
  bool first = true;
  for (int64_t d : dims) {
    if (!first) out.push_back(',');
    out.append(std::to_string(d));
    first = false;
  }
  out.push_back(']');
  return out;
}

inline const char* DataTypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::PRED: return "pred";
    case ffi::DataType::S8: return "s8";
    case ffi::DataType::S16: return "s16";
    case ffi::DataType::S32: return "s32";
    case ffi::DataType::S64: return "s64";
    case ffi::DataType::U8: return "u8";
    case ffi::DataType::U16: return "u16";
    case ffi::DataType::U32: return "u32";
    case ffi::DataType::U64: return "u64";
    case ffi::DataType::F16: return "f16";
    case ffi::DataType::F32: return "f32";
    case ffi::DataType::F64: return "f64";
    case ffi::DataType::BF16: return "bf16";
    default: return "(other dtype)";
  }
}

constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Packed residual sizes for n = M*K elements (README: P, F, Q).
constexpr int64_t NibbleBytes(int64_t n) { return CeilDiv(n, 2); }
constexpr int64_t FlagBytes(int64_t n) { return CeilDiv(n, 8); }
constexpr int FlagPlanes(int qn) { return qn <= 7 ? 1 : 2; }

// `buf` has exactly `rank` dimensions.
template <typename Buf>
ffi::Error CheckRank(const Buf& buf, size_t rank, const char* op,
                     const char* name) {
  const auto dims = buf.dimensions();
  JINT4_CHECK_ARG(dims.size() == rank, op, ": operand/result '", name,
                  "' must have rank ", rank, "; got shape ",
                  ShapeString(dims));
  return ffi::Error::Success();
}

// `buf` has exactly the shape `expected`.
template <typename Buf>
ffi::Error CheckShape(const Buf& buf, std::initializer_list<int64_t> expected,
                      const char* op, const char* name) {
  const auto dims = buf.dimensions();
  bool same = dims.size() == expected.size();
  if (same) {
    size_t i = 0;
    for (int64_t d : expected) same = same && dims[i++] == d;
  }
  JINT4_CHECK_ARG(same, op, ": operand/result '", name, "' must have shape ",
                  ShapeString(expected), "; got ", ShapeString(dims));
  return ffi::Error::Success();
}

// `buf` holds exactly `count` elements, any rank (scalars: count 1; seeds: 2).
template <typename Buf>
ffi::Error CheckElementCount(const Buf& buf, int64_t count, const char* op,
                             const char* name) {
  const auto dims = buf.dimensions();
  JINT4_CHECK_ARG(NumElements(dims) == count, op, ": operand '", name,
                  "' must hold ", count, " element(s); got shape ",
                  ShapeString(dims));
  return ffi::Error::Success();
}

// An optional per-row operand (the bit splits' row_inv): rank 1 holding
// `rows` elements, or empty (absent).
template <typename Buf>
ffi::Error CheckOptionalRows(const Buf& buf, int64_t rows, const char* op,
                             const char* name) {
  const auto dims = buf.dimensions();
  JINT4_CHECK_ARG(dims.size() == 1 && (dims[0] == 0 || dims[0] == rows), op, ": '",
                  name, "' must be f32[", rows, "] (one factor per row of g) or"
                  " empty; got ", ShapeString(dims));
  return ffi::Error::Success();
}

// LSQ range attributes: 1 <= qn <= 8, 1 <= qp <= 7 (4-bit codes).
inline ffi::Error CheckQuantRange(int32_t qn, int32_t qp, const char* op) {
  JINT4_CHECK_ARG(qn >= 1 && qn <= 8 && qp >= 1 && qp <= 7, op,
                  ": attributes need 1 <= qn <= 8 and 1 <= qp <= 7; got qn=",
                  qn, ", qp=", qp);
  return ffi::Error::Success();
}

// 0 <= log2_block <= kMaxLog2Block and 2^log2_block divides `dim`
// (`dim_name` says which dim, e.g. "the contraction dim K").
inline ffi::Error CheckLog2Block(int32_t log2_block, int64_t dim,
                                 const char* dim_name, const char* op) {
  JINT4_CHECK_ARG(log2_block >= 0 && log2_block <= kMaxLog2Block, op,
                  ": log2_block must be in [0, ", kMaxLog2Block, "]; got ",
                  log2_block);
  JINT4_CHECK_ARG(dim % (int64_t{1} << log2_block) == 0, op,
                  ": Hadamard block 2^", log2_block, " = ",
                  (int64_t{1} << log2_block), " does not divide ", dim_name,
                  " = ", dim, "; use a block that divides it");
  return ffi::Error::Success();
}

// The same for the contraction dim K of an activation.
inline ffi::Error CheckLog2Block(int32_t log2_block, int64_t k,
                                 const char* op) {
  return CheckLog2Block(log2_block, k, "the contraction dim K", op);
}

// An int32 attribute used as a 0/1 flag.
inline ffi::Error CheckFlagAttr(int32_t value, const char* op,
                                const char* name) {
  JINT4_CHECK_ARG(value == 0 || value == 1, op, ": attribute '", name,
                  "' must be 0 or 1; got ", value);
  return ffi::Error::Success();
}

// f32, bf16 or f16: the "float" operands and results of the op contract.
inline bool IsFloatType(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 ||
         t == ffi::DataType::F16;
}

template <typename Buf>
ffi::Error CheckFloatType(const Buf& buf, const char* op, const char* name) {
  JINT4_CHECK_ARG(IsFloatType(buf.element_type()), op, ": operand/result '",
                  name, "' must be f32, bf16 or f16; got ",
                  DataTypeName(buf.element_type()));
  return ffi::Error::Success();
}

// Every index[i] (i < n, host memory) lies in [0, limit), or is negative when
// `allow_negative` (an empty slot). `what` names the indexed rows.
inline ffi::Error CheckIndices(const int32_t* index, int64_t n, int64_t limit,
                               bool allow_negative, const char* op,
                               const char* name, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t v = index[i];
    if (v >= limit || (v < 0 && !allow_negative)) {
      return ffi::Error::InvalidArgument(StrCat(
          op, ": ", name, "[", i, "] = ", v, " is out of range: it indexes the ",
          limit, " ", what, ", so it must be in [0, ", limit, ")",
          allow_negative ? " or negative (no row)" : ""));
    }
  }
  return ffi::Error::Success();
}

// The packed residual (nibbles u8[P], flags u8[F, Q]) of n elements quantized
// with `qn` has the sizes of the op contract.
template <typename NibBuf, typename FlagBuf>
ffi::Error CheckResidual(const NibBuf& nibbles, const FlagBuf& flags,
                         int64_t n, int32_t qn, const char* op) {
  JINT4_RETURN_IF_ERROR(CheckShape(nibbles, {NibbleBytes(n)}, op, "nibbles"));
  JINT4_RETURN_IF_ERROR(
      CheckShape(flags, {FlagPlanes(qn), FlagBytes(n)}, op, "flags"));
  return ffi::Error::Success();
}

}  // namespace ffi_util
}  // namespace jint4

#endif  // JINT4_XLA_FFI_COMMON_FFI_UTIL_H_
