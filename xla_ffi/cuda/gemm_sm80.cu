// sm_80 / sm_86 / sm_89: CUTLASS 2.x INT4 tensor-core GEMM (int4b_t x int4b_t
// -> int32, mma.sync m16n8k64), TN: A [M, K] row-major, B [N, K] row-major
// (= K x N column-major), D f32 row-major = alpha * float(acc), alpha read
// from device memory (LinearCombination alpha_ptr, OnlyAlphaScaling: C is
// never read). One instantiation: 128x128x256 threadblock, 64x64x256 warps,
// 3 stages (96 KiB of shared memory: fits sm_86 / sm_89's 99 KiB).
//
// The operands come packed by gemm.cu (two int4 per byte, low nibble first,
// K padded with zeros to a multiple of 32); the row_scale / bf16 epilogue is
// gemm.cu's elementwise kernel.
//
// The kernel is also compiled for sm_90a (where mma.sync .s4 is a software
// routine, ~41 TOPS on H100): never chosen there by the dispatcher, but it
// lets JINT4_CUDA_GEMM=sm80 exercise this path on a Hopper test machine.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm.h"
#include "cutlass/integer_subbyte.h"
#include "cutlass/layout/matrix.h"
#include "cutlass_run.h"
#include "gemm_kernels.h"

namespace jint4 {
namespace cuda {
namespace {

using ElementInt4 = cutlass::int4b_t;

using EpilogueOp = cutlass::epilogue::thread::LinearCombination<
    float, 128 / cutlass::sizeof_bits<float>::value, int32_t, float,
    cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling>;

using Sm80Int4GemmOp = cutlass::gemm::device::Gemm<
    ElementInt4, cutlass::layout::RowMajor,     // A [M, K]
    ElementInt4, cutlass::layout::ColumnMajor,  // B [K, N] col-major = b[N, K]
    float, cutlass::layout::RowMajor,           // D [M, N]
    int32_t,                                    // accumulator
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 256>,
    cutlass::gemm::GemmShape<64, 64, 256>,
    cutlass::gemm::GemmShape<16, 8, 64>,
    EpilogueOp,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
    /*Stages=*/3,
    /*AlignmentA=*/32, /*AlignmentB=*/32,
    /*SplitKSerial=*/false,
    cutlass::arch::OpMultiplyAddSaturate>;

}  // namespace

GemmStatus Sm80Int4Gemm(const Sm80Int4GemmArgs& p, const ScratchFn& scratch,
                        cudaStream_t stream, std::string* message) {
  using RefA = cutlass::TensorRef<ElementInt4 const, cutlass::layout::RowMajor>;
  using RefB = cutlass::TensorRef<ElementInt4 const, cutlass::layout::ColumnMajor>;
  using RefC = cutlass::TensorRef<float const, cutlass::layout::RowMajor>;
  using RefD = cutlass::TensorRef<float, cutlass::layout::RowMajor>;

  typename Sm80Int4GemmOp::Arguments args(
      cutlass::gemm::GemmCoord(p.M, p.N, p.K),
      RefA(reinterpret_cast<ElementInt4 const*>(p.a4), cutlass::layout::RowMajor(p.K)),
      RefB(reinterpret_cast<ElementInt4 const*>(p.b4), cutlass::layout::ColumnMajor(p.K)),
      RefC(p.d, cutlass::layout::RowMajor(p.ldd)),  // never read (alpha only)
      RefD(p.d, cutlass::layout::RowMajor(p.ldd)),
      typename EpilogueOp::Params(p.alpha),
      /*split_k_slices=*/1);

  return RunCutlassGemm<Sm80Int4GemmOp>(args, scratch, stream, "sm80 int4 gemm", message);
}

}  // namespace cuda
}  // namespace jint4
