// sm_90a: CUTLASS 3.x INT8 x INT8 -> INT32 TN GEMM (wgmma, TMA,
// warp-specialized persistent kernels) with an epilogue visitor tree
// computing out = ((float(acc) * scale) * row_scale[m]) + col_bias[n], f32 or
// bf16. The template lives in gemm_sm90_impl.cuh (parameterized by tile,
// cluster and schedules, for experiments); this TU instantiates the config
// in use, 128x256x128, cluster 1x2, cooperative, with f32 and bf16 outputs.
//
// Tile-scheduler knobs (environment, read on every call, silent: nothing is
// logged; an unset or invalid value means the default):
//   JINT4_GEMM_SWIZZLE      the persistent tile scheduler's max swizzle size,
//                           1, 2, 4 or 8 (default 1, CUTLASS's default)
//   JINT4_GEMM_RASTER       the scheduler's raster order: auto (default,
//                           CUTLASS's heuristic: along M when there are more
//                           N tiles than M tiles, else along N), m, n
// The outputs are bit-identical across knobs. tools/gemm_sweep.py times them.
// Measured by that sweep (H200, 2026-11-28, six shapes from 8192^3 to
// 16384x16384x4096, back-to-back calls): this config with the defaults had
// the best geometric mean (1454 TOPS; XLA's int8 dot alone ~1440-1590)
// against 128x256 cluster 2x1, 256x128 cluster 2x1 (cooperative) and 128x128
// ping-pong, each under every knob; the best per shape was at most 9% faster.
// The kernel bodies are guarded by CUTLASS itself (ENABLE_SM90_KERNEL_LEVEL,
// i.e. __CUDA_ARCH_FEAT_SM90_ALL): the sm_80 device pass compiles them to a
// stub that never runs (the dispatcher only calls this on compute 9.0).
#include <cuda_runtime.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "gemm_kernels.h"
#include "gemm_sm90_impl.cuh"

namespace jint4 {
namespace cuda {

#if defined(JINT4_HAVE_SM90_GEMM)

GemmStatus Sm90Gemm128x256C1x2(const Sm90GemmArgs& args, const Sm90Sched& sched,
                               const ScratchFn& scratch, cudaStream_t stream,
                               std::string* message) {
  using Cfg = sm90::Config<cute::Shape<cute::_128, cute::_256, cute::_128>,
                           cute::Shape<cute::_1, cute::_2, cute::_1>, sm90::Cooperative,
                           sm90::CooperativeEpilogue>;
  return sm90::RunConfig<Cfg>(args, sched, scratch, stream, message);
}

namespace {

Sm90Sched RequestedSched() {
  Sm90Sched sched;
  if (const char* env = std::getenv("JINT4_GEMM_SWIZZLE")) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(env, &end, 10);
    if (errno == 0 && end != env && *end == '\0' && (v == 1 || v == 2 || v == 4 || v == 8)) {
      sched.max_swizzle = static_cast<int>(v);
    }
  }
  if (const char* env = std::getenv("JINT4_GEMM_RASTER")) {
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    if (std::strcmp(env, "m") == 0) sched.raster = Raster::AlongM;
    if (std::strcmp(env, "n") == 0) sched.raster = Raster::AlongN;
  }
  return sched;
}

}  // namespace

bool Sm90GemmAvailable() { return true; }

GemmStatus Sm90Gemm(const Sm90GemmArgs& args, const ScratchFn& scratch,
                    cudaStream_t stream, std::string* message) {
  return Sm90Gemm128x256C1x2(args, RequestedSched(), scratch, stream, message);
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
