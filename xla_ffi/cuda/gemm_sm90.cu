// sm_90a: CUTLASS 3.x INT8 x INT8 -> INT32 TN GEMM (wgmma, TMA,
// warp-specialized persistent kernels) with an epilogue visitor tree
// computing out = ((float(acc) * scale) * row_scale[m]) + col_bias[n], f32 or
// bf16. The template lives in gemm_sm90_impl.cuh (parameterized by tile,
// cluster and schedules); each compiled config has its own TU (this one holds
// 128x256x128, cluster 1x2, cooperative) and Sm90Gemm picks one per call.
//
// The choice (DefaultChoice): 128x256, cluster 1x2, swizzle 1 everywhere but
// where one operand is streamed whole through every wave of tiles. CUTLASS's
// raster order walks the longer tile dimension inside each band of the other,
// so each wave of 132 tiles reads the whole operand along the walk (B[N, K]
// when walking N); when that extent is >= 12288 rows, the config is 128x256
// with cluster 2x1 (the pair of CTAs shares, i.e. multicasts, its B tile)
// and swizzle 8 (the walk covers 8 bands at a time), so that such a wave
// loads each B tile once per CTA pair. Chosen from a
// tools/gemm_sweep.py sweep of every compiled config, swizzle and raster
// order over the GEMM shapes of a train step and the paper's largest ones
// (BENCHMARKS.md, GEMM): only there did 2x1 / swizzle 8 win; on every other
// shape 128x256 cluster 1x2 swizzle 1 was the best or within the sweep's
// spread of it.
//
// Knobs (environment, read on every call):
//   JINT4_GEMM_SM90_CONFIG  forces a compiled config by name (kConfigs; an
//                           unknown name is an error that lists them); its
//                           scheduler then starts from CUTLASS's defaults
//   JINT4_GEMM_SWIZZLE      the persistent tile scheduler's max swizzle size,
//                           1, 2, 4 or 8 (an invalid value: the default)
//   JINT4_GEMM_RASTER       the scheduler's raster order: auto (CUTLASS's
//                           heuristic: along M when there are more N tiles
//                           than M tiles, else along N), m, n
// The outputs are bit-identical across configs and knobs
// (tests/kernels/test_native_gpu.py). The kernel bodies are guarded by CUTLASS
// itself (ENABLE_SM90_KERNEL_LEVEL, i.e. __CUDA_ARCH_FEAT_SM90_ALL): the sm_80
// device pass compiles them to a stub that never runs (the dispatcher only
// calls this on compute 9.0).
#include <cuda_runtime.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "gemm_kernels.h"
#include "gemm_sm90_impl.cuh"

namespace jint4 {
namespace cuda {

#if defined(JINT4_HAVE_SM90_GEMM)

JINT4_SM90_GEMM_CONFIG(Sm90Gemm128x256C1x2, 128, 256, 1, 2, Cooperative)

namespace {

struct NamedConfig {
  const char* name;
  Sm90ConfigFn run;
};

// The compiled configs; JINT4_GEMM_SM90_CONFIG names one (tools/gemm_sweep.py).
constexpr NamedConfig kConfigs[] = {
    {"128x256_c1x2", &Sm90Gemm128x256C1x2},
    {"128x256_c2x1", &Sm90Gemm128x256C2x1},
    {"256x128_c2x1", &Sm90Gemm256x128C2x1},
    {"256x128_c1x2", &Sm90Gemm256x128C1x2},
    {"128x128_c1x2_pingpong", &Sm90Gemm128x128C1x2Pingpong},
};

struct Choice {
  Sm90ConfigFn run;
  Sm90Sched sched;
};

// The config and scheduler for a problem (see the top of this file).
Choice DefaultChoice(const Sm90GemmArgs& args) {
  const int64_t tiles_m = (args.M + 127) / 128, tiles_n = (args.N + 255) / 256;
  const int64_t walked = tiles_n > tiles_m ? args.M : args.N;  // CUTLASS's raster heuristic
  Sm90Sched sched;
  if (walked >= 12288) {
    sched.max_swizzle = 8;
    return {&Sm90Gemm128x256C2x1, sched};
  }
  return {&Sm90Gemm128x256C1x2, sched};
}

// JINT4_GEMM_SM90_CONFIG, then the scheduler knobs, over DefaultChoice;
// false and a message for a config name that is not compiled in.
bool RequestedChoice(const Sm90GemmArgs& args, Choice* choice, std::string* message) {
  *choice = DefaultChoice(args);
  const char* env = std::getenv("JINT4_GEMM_SM90_CONFIG");
  if (env != nullptr && *env != '\0') {
    std::string names;
    const NamedConfig* found = nullptr;
    for (const NamedConfig& c : kConfigs) {
      if (std::strcmp(env, c.name) == 0) found = &c;
      names += std::string(names.empty() ? "" : ", ") + c.name;
    }
    if (found == nullptr) {
      *message = std::string("JINT4_GEMM_SM90_CONFIG='") + env +
                 "' names no compiled GEMM config; unset it or use one of: " + names;
      return false;
    }
    *choice = {found->run, Sm90Sched{}};
  }
  Sm90Sched& sched = choice->sched;
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
    if (std::strcmp(env, "auto") == 0) sched.raster = Raster::Heuristic;
  }
  return true;
}

}  // namespace

bool Sm90GemmAvailable() { return true; }

GemmStatus Sm90Gemm(const Sm90GemmArgs& args, const ScratchFn& scratch,
                    cudaStream_t stream, std::string* message) {
  Choice choice;
  if (!RequestedChoice(args, &choice, message)) return GemmStatus::kError;
  return choice.run(args, choice.sched, scratch, stream, message);
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
