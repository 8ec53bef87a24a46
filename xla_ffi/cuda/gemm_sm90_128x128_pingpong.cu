// sm_90a INT8 GEMM config: CTA tile 128x128x128, cluster 1x2, ping-pong (two
// consumer warp groups on alternate tiles, so one's epilogue overlaps the
// other's mainloop; the template: gemm_sm90_impl.cuh).
#include "gemm_sm90_impl.cuh"

namespace jint4 {
namespace cuda {

#if defined(JINT4_HAVE_SM90_GEMM)
GemmStatus Sm90Gemm128x128C1x2Pingpong(const Sm90GemmArgs& args, const Sm90Sched& sched,
                                       const ScratchFn& scratch, cudaStream_t stream,
                                       std::string* message) {
  using Cfg = sm90::Config<cute::Shape<cute::_128, cute::_128, cute::_128>,
                           cute::Shape<cute::_1, cute::_2, cute::_1>, sm90::Pingpong,
                           sm90::PingpongEpilogue>;
  return sm90::RunConfig<Cfg>(args, sched, scratch, stream, message);
}
#endif

}  // namespace cuda
}  // namespace jint4
