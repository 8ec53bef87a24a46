// Decoders of jint4's packed backward residual shared by the CUDA handlers
// that read it (residual_values.cu, lsq_backward.cu). Layout (README):
// nibble of element 2j in the low half of byte j; bit b of byte j of flag
// plane p = bit p of element 8j + b. Whole groups of 8 decode with word
// operations (DecodeGroupQ, ClipTops); DecodeAt (device_util.cuh) decodes one
// element at any index.
#ifndef JINT4_XLA_FFI_CUDA_RESIDUAL_DECODE_CUH_
#define JINT4_XLA_FFI_CUDA_RESIDUAL_DECODE_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common/jint4_math.h"
#include "cuda_common.h"
#include "cuda_ffi.h"

namespace jint4 {
namespace cuda {

// The codes and first flag plane of the whole group of 8 elements at flat
// index e (a multiple of 8; nibbles 4-byte aligned): its four nibble bytes
// (one 4-byte load) and its flag byte. Enough for the q values (DecodeGroupQ).
__device__ __forceinline__ void LoadCodes(const uint8_t* __restrict__ nibbles,
                                          const uint8_t* __restrict__ flags, int64_t e,
                                          uint32_t* nib, uint32_t* f0) {
  *nib = *reinterpret_cast<const uint32_t*>(nibbles + (e >> 1));  // 4-aligned
  *f0 = flags[e >> 3];
}

// LoadCodes plus the second flag plane's byte (f1 stays as it is for one
// plane): the STE mask and delta of two-plane residuals need it.
__device__ __forceinline__ void LoadGroup(const uint8_t* __restrict__ nibbles,
                                          const uint8_t* __restrict__ flags,
                                          int64_t plane_stride, int planes, int64_t e,
                                          uint32_t* nib, uint32_t* f0, uint32_t* f1) {
  LoadCodes(nibbles, flags, e, nib, f0);
  if (planes == 2) *f1 = flags[plane_stride + (e >> 3)];
}

// SWAR decoders of a group of 8 (the same values as DecodeBackwardState of
// each element, from a few word operations per group instead of a dozen
// integer operations per element; the integer pipe bounds these kernels on
// Hopper).

// Elements 4h .. 4h+3 of a group as int8 q, element 4h + c in byte c:
// the code nibbles spread to bytes and sign-extended (two's complement
// nibble: bytes with bit 3 set get 0xF0); with one flag plane (qn <= 7) the
// bytes whose nibble is kClipCode (unsigned 8) take bit0 ? qp : -qn (qp4 /
// qn4: those values in every byte). Byte arithmetic never carries across
// bytes: every byte stays below 0x100 (w ^ 8 <= 15, + 0x7F <= 0x8E; 8 * 0x1E =
// 0xF0; the bit spread multiply places bits 0..3 of b at bits 0, 8, 16, 24
// with no two partial products on one bit).
__device__ __forceinline__ uint32_t DecodeHalfQ(uint32_t nib, uint32_t f0, int h, int qn,
                                                uint32_t qp4, uint32_t qn4) {
  const uint32_t x = __byte_perm(nib, 0u, h ? 0x3322 : 0x1100);  // nibble bytes b, b, b', b'
  const uint32_t w = (x & 0x000F000Fu) | ((x >> 4) & 0x0F000F00u);  // one nibble per byte
  const uint32_t q = w | ((w & 0x08080808u) * 0x1Eu);
  if (qn > 7) return q;  // two planes: the code is q
  const uint32_t inside_top = ((w ^ 0x08080808u) + 0x7F7F7F7Fu) & 0x80808080u;
  const uint32_t clip_mask = ((~inside_top & 0x80808080u) >> 7) * 0xFFu;
  const uint32_t bit0 = (((f0 >> (4 * h)) & 0xFu) * 0x00204081u) & 0x01010101u;
  const uint32_t bit0_mask = bit0 * 0xFFu;
  const uint32_t clip_value = (bit0_mask & qp4) | (~bit0_mask & qn4);
  return (clip_mask & clip_value) | (~clip_mask & q);
}

// qp and -qn (as int8) in every byte, for DecodeHalfQ.
__device__ __forceinline__ uint32_t ByteSplat(int v) {
  return static_cast<uint32_t>(static_cast<uint8_t>(v)) * 0x01010101u;
}

// The eight codes q of a group, one byte each, element b in byte b of the
// pair of words.
__device__ __forceinline__ uint2 DecodeGroupQ(uint32_t nib, uint32_t f0, int qn, int qp) {
  const uint32_t qp4 = ByteSplat(qp), qn4 = ByteSplat(-qn);
  return make_uint2(DecodeHalfQ(nib, f0, 0, qn, qp4, qn4), DecodeHalfQ(nib, f0, 1, qn, qp4, qn4));
}

// Bit 4b + 3 set for each clipped element b of a group with one flag plane
// (qn <= 7; the STE mask's zeros): its code nibble is kClipCode, 1000b
// (low3 + 7 sets bit 3 of its nibble exactly when low3 != 0, and never
// carries out of it).
__device__ __forceinline__ uint32_t ClipTops(uint32_t nib) {
  const uint32_t low3_nonzero = ((nib & 0x77777777u) + 0x77777777u) & 0x88888888u;
  return nib & ~low3_nonzero & 0x88888888u;
}

// (x & mask) != 0 ? a : b, written in PTX so that the test stays one
// logic-op-to-predicate (LLVM would rewrite a C++ bit test as shift, mask and
// compare: three integer operations instead of one).
template <uint32_t kMask>
__device__ __forceinline__ float SelectIfBits(uint32_t x, float a, float b) {
  float r;
  asm("{\n\t.reg .pred p;\n\t.reg .b32 t;\n\t"
      "and.b32 t, %1, %2;\n\tsetp.ne.u32 p, t, 0;\n\tselp.f32 %0, %3, %4, p;\n\t}"
      : "=f"(r) : "r"(x), "n"(kMask), "f"(a), "f"(b));
  return r;
}

// Element i of a group with one flag plane (ClipTops): acc += g[i] *
// delta_hat, v[i] = STE-masked g[i], delta_hat = clipped ? (bit0 ? qp : -qn)
// : (bit0 ? 0.5 : -0.5) (DecodeBackwardState; qp_f = qp, qn_f = -qn).
template <int i>
__device__ __forceinline__ void DecodeMaskDelta(uint32_t tops, uint32_t f0, float qp_f,
                                                float qn_f, const float* g, float* v,
                                                float* acc) {
  constexpr uint32_t kClip = 8u << (4 * i), kBit0 = 1u << i;
  const float dh = SelectIfBits<kClip>(tops, SelectIfBits<kBit0>(f0, qp_f, qn_f),
                                       SelectIfBits<kBit0>(f0, 0.5f, -0.5f));
  *acc = *acc + g[i] * dh;
  v[i] = SelectIfBits<kClip>(tops, 0.0f, g[i]);
}

// Checks the residual buffers against the element count; returns planes.
inline ffi::Error CheckResidual(const char* op, ffi::AnyBuffer nibbles,
                                ffi::AnyBuffer flags, int64_t total, int32_t qn,
                                int32_t qp, int* planes) {
  ffi::Error range = CheckQuantRange(qn, qp, op);
  if (range.failure()) return range;
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

}  // namespace cuda
}  // namespace jint4

#endif  // JINT4_XLA_FFI_CUDA_RESIDUAL_DECODE_CUH_
