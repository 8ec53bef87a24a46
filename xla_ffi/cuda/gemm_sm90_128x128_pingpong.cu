// sm_90a INT8 GEMM config: CTA tile 128x128x128, cluster 1x2, ping-pong (two
// consumer warp groups on alternate tiles, so one's epilogue overlaps the
// other's mainloop; the template: gemm_sm90_impl.cuh).
#include "gemm_sm90_impl.cuh"

namespace jint4 {
namespace cuda {

#if defined(JINT4_HAVE_SM90_GEMM)
JINT4_SM90_GEMM_CONFIG(Sm90Gemm128x128C1x2Pingpong, 128, 128, 1, 2, Pingpong)
#endif

}  // namespace cuda
}  // namespace jint4
