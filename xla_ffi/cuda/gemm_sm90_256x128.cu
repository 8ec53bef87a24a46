// sm_90a INT8 GEMM configs: CTA tile 256x128x128, cooperative, cluster 2x1
// and 1x2 (the template: gemm_sm90_impl.cuh; picked per call in gemm_sm90.cu).
#include "gemm_sm90_impl.cuh"

namespace jint4 {
namespace cuda {

#if defined(JINT4_HAVE_SM90_GEMM)
GemmStatus Sm90Gemm256x128C2x1(const Sm90GemmArgs& args, const Sm90Sched& sched,
                               const ScratchFn& scratch, cudaStream_t stream,
                               std::string* message) {
  using Cfg = sm90::Config<cute::Shape<cute::_256, cute::_128, cute::_128>,
                           cute::Shape<cute::_2, cute::_1, cute::_1>, sm90::Cooperative,
                           sm90::CooperativeEpilogue>;
  return sm90::RunConfig<Cfg>(args, sched, scratch, stream, message);
}

GemmStatus Sm90Gemm256x128C1x2(const Sm90GemmArgs& args, const Sm90Sched& sched,
                               const ScratchFn& scratch, cudaStream_t stream,
                               std::string* message) {
  using Cfg = sm90::Config<cute::Shape<cute::_256, cute::_128, cute::_128>,
                           cute::Shape<cute::_1, cute::_2, cute::_1>, sm90::Cooperative,
                           sm90::CooperativeEpilogue>;
  return sm90::RunConfig<Cfg>(args, sched, scratch, stream, message);
}
#endif

}  // namespace cuda
}  // namespace jint4
