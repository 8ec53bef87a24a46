// jint4's CPU XLA FFI handlers, one per op of the contract in
// xla_ffi/README.md (defined in handlers.cc, math in kernels.cc).
//
// XLA_FFI_DECLARE_HANDLER_SYMBOL carries no visibility attribute; the pragma
// gives these symbols default visibility under -fvisibility=hidden.
#ifndef JINT4_XLA_FFI_CPU_HANDLERS_H_
#define JINT4_XLA_FFI_CPU_HANDLERS_H_

#include "xla/ffi/api/ffi.h"

#pragma GCC visibility push(default)

XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cpu_hadamard_quantize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cpu_hadamard_quantize_weight);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cpu_residual_values);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cpu_lsq_backward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cpu_lsq_weight_backward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cpu_bit_split);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cpu_int_gemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cpu_bit_split_joined);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jint4_cpu_resplit_rows);

#pragma GCC visibility pop

#endif  // JINT4_XLA_FFI_CPU_HANDLERS_H_
