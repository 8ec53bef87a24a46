// jint4's CUDA XLA FFI handlers (the op contract: xla_ffi/README.md).
//
// Each handler binds Ctx<PlatformStream<cudaStream_t>> first (those that need
// scratch memory also Ctx<ScratchAllocator>; contexts take no operand), then
// exactly the operands, results and attributes of its row of the README
// table, in order:
//   jint4_cuda_hadamard_quantize, jint4_cuda_hadamard_quantize_weight  quantize.cu
//   jint4_cuda_residual_values                                         residual_values.cu
//   jint4_cuda_lsq_backward                                            lsq_backward.cu
//   jint4_cuda_lsq_weight_backward                                     lsq_weight_backward.cu
//   jint4_cuda_bit_split, jint4_cuda_bit_split_joined,
//   jint4_cuda_resplit_rows                                            bitsplit.cu
//   jint4_cuda_int_gemm                         gemm.cu (gemm_sm90*.cu, gemm_sm80.cu)
// All integer attributes are int32. Scalars (step, scale, log2_block, seeds)
// stay in device memory; no handler synchronizes with the host.
//
// Sources: quantize.cu residual_values.cu lsq_backward.cu lsq_weight_backward.cu
// bitsplit.cu gemm.cu gemm_sm90*.cu gemm_sm80.cu (+ headers cuda_common.h
// cuda_ffi.h device_util.cuh residual_decode.cuh gemm_kernels.h).
//
// nvcc flags used (nvcc 13.0), for every .cu of this folder (compile each
// with -c; link the objects into the extension with the usual CUDA runtime):
//   -std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -fmad=false
//   -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a
//   -Xptxas=-warn-spills -Xcompiler -fPIC
//   -isystem <jaxlib>/include -I<repo>/xla_ffi
//   -isystem <cutlass>/include -isystem <cutlass>/tools/util/include
// where <jaxlib>/include is the FFI headers of jaxlib 0.10.2 (FFI API 0.3; also
// checked against 0.12's API 0.5) and <cutlass> =
// <site-packages>/cutlass_library/source (nvidia-cutlass 4.2.0.0; only
// gemm_sm90*.cu and gemm_sm80.cu include it).
//   * -DNDEBUG is required: without it ptxas serializes the sm_90a wgmma
//     (warning C7510) and the GEMM loses up to 30%.
//   * -fmad=false is required for quantize.cu, residual_values.cu,
//     lsq_backward.cu, lsq_weight_backward.cu and bitsplit.cu (keeps
//     the float arithmetic of jint4_math.h un-contracted, so the integer
//     outputs stay bit-identical to the reference); it is harmless for the
//     GEMM files (their epilogues only multiply), so one flag set serves all.
//   * -isystem (rather than -I) for jaxlib and CUTLASS only silences warnings
//     inside their headers (nvcc #940-D / #2473-D, gcc -Wreturn-type in the
//     FFI headers); -I works too.
//   * Expected ptxas output: one spill warning (176 bytes) for the sm_90a
//     copy of the sm80 INT4 kernel in gemm_sm80.cu (mma.sync .s4 is emulated
//     on Hopper; that copy only serves JINT4_CUDA_GEMM=sm80 tests). No C7510.
//   * Optional: add -gencode=arch=compute_80,code=compute_80 to embed PTX, so
//     the memory-bound kernels and the fallback GEMM also run (JIT) on GPUs
//     newer than sm_90 (there the GEMM dispatch picks the fallback kernel).
//   * Do not pass -use_fast_math / --ftz=true / -prec-div=false /
//     -prec-sqrt=false.
// Compile times on a 2-core machine (wall, both archs): quantize 12 s,
// residual_values ~8 s, lsq_backward ~13 s, lsq_weight_backward ~15 s,
// bitsplit 12 s, gemm 16 s, gemm_sm80 21 s, and about 110 s for
// each of the four gemm_sm90*.cu (two or four CUTLASS 3 instantiations each;
// a parallel build runs them side by side); ~9 min serial in total.
#ifndef JINT4_XLA_FFI_CUDA_HANDLERS_H_
#define JINT4_XLA_FFI_CUDA_HANDLERS_H_

#include "xla/ffi/api/api.h"

// Default visibility even under -fvisibility=hidden (the declare macro carries
// no visibility attribute; the definitions inherit it from these declarations).
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC visibility push(default)
#endif
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cuda_hadamard_quantize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cuda_hadamard_quantize_weight);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cuda_residual_values);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cuda_lsq_backward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cuda_lsq_weight_backward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cuda_bit_split);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cuda_int_gemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cuda_bit_split_joined);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cuda_resplit_rows);
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC visibility pop
#endif

#endif  // JINT4_XLA_FFI_CUDA_HANDLERS_H_
