// The sm_90a CUTLASS 3.x INT8 x INT8 -> INT32 TN GEMM template, parameterized
// by CTA tile, cluster and schedules (tools/gemm_sweep.py compares them);
// each compiled config is instantiated in its own gemm_sm90*.cu, so that a
// parallel build compiles them side by side, and gemm_sm90.cu picks one.
//
// Without CUTLASS 3 sm90 support (CUTLASS_ARCH_MMA_SM90_SUPPORTED, a property
// of the compiler, so the same in the host and every device pass) nothing
// but JINT4_HAVE_SM90_GEMM's absence is declared. With it, the kernel bodies
// are guarded by CUTLASS itself (ENABLE_SM90_KERNEL_LEVEL, i.e.
// __CUDA_ARCH_FEAT_SM90_ALL): the sm_80 device pass compiles them to stubs
// that never run (the dispatcher only calls them on compute 9.0).
#ifndef JINT4_XLA_FFI_CUDA_GEMM_SM90_IMPL_CUH_
#define JINT4_XLA_FFI_CUDA_GEMM_SM90_IMPL_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cutlass/arch/config.h"
#include "cutlass/cutlass.h"
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
#include "cutlass/gemm/kernel/tile_scheduler_detail.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass_run.h"

namespace jint4 {
namespace cuda {

// Persistent tile scheduler knobs (CUTLASS's defaults: swizzle 1, heuristic
// raster order: along M when there are more N tiles than M tiles, else N).
struct Sm90Sched {
  int max_swizzle = 1;  // 1, 2, 4 or 8
  cutlass::gemm::kernel::detail::RasterOrderOptions raster =
      cutlass::gemm::kernel::detail::RasterOrderOptions::Heuristic;
};

// The compiled configs, one TU each (gemm_sm90*.cu), so that a parallel build
// compiles them side by side; gemm_sm90.cu picks one per call.
using Sm90ConfigFn = GemmStatus (*)(const Sm90GemmArgs&, const Sm90Sched&, const ScratchFn&,
                                    cudaStream_t, std::string*);
// CTA tile 128x256x128, cluster 1x2, cooperative (gemm_sm90.cu).
GemmStatus Sm90Gemm128x256C1x2(const Sm90GemmArgs&, const Sm90Sched&, const ScratchFn&,
                               cudaStream_t, std::string*);
// CTA tile 128x256x128, cluster 2x1, cooperative (gemm_sm90_128x256_c2x1.cu).
GemmStatus Sm90Gemm128x256C2x1(const Sm90GemmArgs&, const Sm90Sched&, const ScratchFn&,
                               cudaStream_t, std::string*);
// CTA tile 256x128x128, cluster 2x1, cooperative (gemm_sm90_256x128.cu).
GemmStatus Sm90Gemm256x128C2x1(const Sm90GemmArgs&, const Sm90Sched&, const ScratchFn&,
                               cudaStream_t, std::string*);
// CTA tile 256x128x128, cluster 1x2, cooperative (gemm_sm90_256x128.cu).
GemmStatus Sm90Gemm256x128C1x2(const Sm90GemmArgs&, const Sm90Sched&, const ScratchFn&,
                               cudaStream_t, std::string*);
// CTA tile 128x128x128, cluster 1x2, ping-pong (gemm_sm90_128x128_pingpong.cu).
GemmStatus Sm90Gemm128x128C1x2Pingpong(const Sm90GemmArgs&, const Sm90Sched&,
                                       const ScratchFn&, cudaStream_t, std::string*);

namespace sm90 {

using namespace cute;

constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// A GEMM configuration: CTA tile (M, N, K), cluster shape, mainloop and
// epilogue schedules.
template <class TileShape_, class ClusterShape_, class KernelSchedule_, class EpilogueSchedule_>
struct Config {
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using KernelSchedule = KernelSchedule_;
  using EpilogueSchedule = EpilogueSchedule_;
};

// out = (float(acc) * scale) * row_scale[m] + col_bias[n] as ElementD.
template <class ElementD, class Cfg>
struct Int8Gemm {
  using TileShape = typename Cfg::TileShape;
  using ClusterShape = typename Cfg::ClusterShape;
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
      typename Cfg::EpilogueSchedule, EVT>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, cutlass::layout::RowMajor, kAlignAB,     // a[M, K], K-major
      ElementB, cutlass::layout::ColumnMajor, kAlignAB,  // b[N, K], K-major
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Cfg::KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<
      Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;

  static GemmStatus Run(const Sm90GemmArgs& p, const Sm90Sched& sched,
                        const ScratchFn& scratch, cudaStream_t stream,
                        std::string* message) {
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
    args.scheduler.max_swizzle_size = sched.max_swizzle;
    args.scheduler.raster_order = sched.raster;

    return RunCutlassGemm<Gemm>(args, scratch, stream, "sm90 gemm", message);
  }
};

// The f32 / bf16 dispatch of one config.
template <class Cfg>
GemmStatus RunConfig(const Sm90GemmArgs& args, const Sm90Sched& sched,
                     const ScratchFn& scratch, cudaStream_t stream, std::string* message) {
  if (args.out_bf16) {
    return Int8Gemm<cutlass::bfloat16_t, Cfg>::Run(args, sched, scratch, stream, message);
  }
  return Int8Gemm<float, Cfg>::Run(args, sched, scratch, stream, message);
}

using Cooperative = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CooperativeEpilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingpongEpilogue = cutlass::epilogue::TmaWarpSpecialized;

}  // namespace sm90

// Defines one of the config functions declared above: CTA tile TM x TN x 128,
// cluster CM x CN, mainloop / epilogue schedules sm90::SCHED /
// sm90::SCHED##Epilogue (Cooperative or Pingpong). Used inside namespace
// jint4::cuda, once per gemm_sm90*.cu.
#define JINT4_SM90_GEMM_CONFIG(FN, TM, TN, CM, CN, SCHED)                                  \
  GemmStatus FN(const Sm90GemmArgs& args, const Sm90Sched& sched, const ScratchFn& scratch, \
                cudaStream_t stream, std::string* message) {                              \
    using Cfg = sm90::Config<cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::_128>,        \
                             cute::Shape<cute::Int<CM>, cute::Int<CN>, cute::_1>,          \
                             sm90::SCHED, sm90::SCHED##Epilogue>;                          \
    return sm90::RunConfig<Cfg>(args, sched, scratch, stream, message);                    \
  }
}  // namespace cuda
}  // namespace jint4

#endif  // JINT4_HAVE_SM90_GEMM

#endif  // JINT4_XLA_FFI_CUDA_GEMM_SM90_IMPL_CUH_
