// sm_90a: CUTLASS 3.x INT8 x INT8 -> INT32 TN GEMM (wgmma, TMA,
// warp-specialized cooperative persistent kernel) with an epilogue visitor
// tree computing out = (float(acc) * scale) * row_scale[m], f32 or bf16.
//
// Two instantiations (out f32, out bf16); tile 128x256x128, cluster 1x2.
// The kernel bodies are guarded by CUTLASS itself (ENABLE_SM90_KERNEL_LEVEL,
// i.e. __CUDA_ARCH_FEAT_SM90_ALL): the sm_80 device pass compiles them to a
// stub that never runs (the dispatcher only calls this on compute 9.0).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cutlass/arch/config.h"
#include "cutlass/cutlass.h"
#include "cutlass_run.h"
#include "gemm_kernels.h"

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
#define JINT4_HAVE_SM90_GEMM 1
#endif

#if defined(JINT4_HAVE_SM90_GEMM)
#include "cute/tensor.hpp"
#include "cutlass/bfloat16.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/functional.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"
#endif

namespace jint4 {
namespace cuda {

#if defined(JINT4_HAVE_SM90_GEMM)
namespace {

using namespace cute;

// Measured on H200 (8192^3 and 16384x4096x4096, f32 / bf16 out): 128x256
// cooperative with a 1x2 cluster 1360-1575 TOPS; 128x128 cooperative and
// 128x128 ping-pong (cluster 1x1) 3-15% slower. XLA's own int8 TN dot: 1100-1260.
using TileShape = Shape<_128, _256, _128>;
using ClusterShape = Shape<_1, _2, _1>;
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

template <class ElementD>
struct Sm90Int8Gemm {
  using ElementA = int8_t;
  using ElementB = int8_t;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  static constexpr int kAlignAB = 16;  // 16 bytes of int8: TMA
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  // ((float(acc) * scale) * row_scale[m]) + col_bias[n]
  using ScaleAcc = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementCompute,
                                             ElementCompute, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch,
      cutlass::epilogue::fusion::Sm90ScalarBroadcast<ElementCompute>>;
  using RowScale = cutlass::epilogue::fusion::Sm90ColBroadcast<
      0, TileShape, ElementCompute, ElementCompute, Stride<_1, _0, int64_t>,
      /*Alignment=*/1>;
  using Scaled = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementCompute,
                                             ElementCompute, kRound>,
      ScaleAcc, RowScale>;
  using ColBias = cutlass::epilogue::fusion::Sm90RowBroadcast<
      0, TileShape, ElementCompute, ElementCompute, Stride<_0, _1, int64_t>,
      /*Alignment=*/1>;
  using EVT = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, ElementD,
                                             ElementCompute, kRound>,
      Scaled, ColBias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, cutlass::layout::RowMajor, kAlignD,       // no C
      ElementD, cutlass::layout::RowMajor, kAlignD,   // D
      EpilogueSchedule, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, cutlass::layout::RowMajor, kAlignAB,     // a[M, K], K-major
      ElementB, cutlass::layout::ColumnMajor, kAlignAB,  // b[N, K], K-major
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<
      Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;

  static GemmStatus Run(const Sm90GemmArgs& p, const ScratchFn& scratch,
                        cudaStream_t stream, std::string* message) {
    StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(p.M, p.K, 1));
    StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(p.N, p.K, 1));
    StrideD stride_d = cutlass::make_cute_packed_stride(
        StrideD{}, make_shape(p.M, static_cast<int>(p.ldo), 1));
    StrideC stride_c = cutlass::make_cute_packed_stride(
        StrideC{}, make_shape(p.M, static_cast<int>(p.ldo), 1));

    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = p.device;
    hw_info.sm_count = p.sm_count;

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {p.M, p.N, p.K, 1},
        {p.a, stride_a, p.b, stride_b},
        {{},  // epilogue.thread, set below
         nullptr, stride_c, reinterpret_cast<ElementD*>(p.out), stride_d},
        hw_info};
    // EVT arguments: {first child, ..., last child, op}.
    args.epilogue.thread = {
        {                                 // Scaled
         {                                //   ScaleAcc: acc * scale
          {},                             //     acc
          {{1.0f}, {p.scale}, {}},        //     scale: read from *p.scale
          {}},                            //     multiplies
         {p.row_scale, 1.0f, {}},         //   row_scale[m] (nullptr -> 1)
         {}},                             //   multiplies
        {p.col_bias, 0.0f, {}},           // col_bias[n] (nullptr -> 0)
        {}};                              // plus, convert to ElementD

    return RunCutlassGemm<Gemm>(args, scratch, stream, "sm90 gemm", message);
  }
};

}  // namespace

bool Sm90GemmAvailable() { return true; }

GemmStatus Sm90Gemm(const Sm90GemmArgs& args, const ScratchFn& scratch,
                    cudaStream_t stream, std::string* message) {
  if (args.out_bf16) {
    return Sm90Int8Gemm<cutlass::bfloat16_t>::Run(args, scratch, stream, message);
  }
  return Sm90Int8Gemm<float>::Run(args, scratch, stream, message);
}

#else  // !JINT4_HAVE_SM90_GEMM

bool Sm90GemmAvailable() { return false; }

GemmStatus Sm90Gemm(const Sm90GemmArgs&, const ScratchFn&, cudaStream_t,
                    std::string* message) {
  *message = "sm90 gemm not compiled in";
  return GemmStatus::kUnsupported;
}

#endif  // JINT4_HAVE_SM90_GEMM

}  // namespace cuda
}  // namespace jint4
