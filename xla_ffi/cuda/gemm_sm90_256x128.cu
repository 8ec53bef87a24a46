// sm_90a INT8 GEMM configs: CTA tile 256x128x128, cooperative, cluster 2x1
// and 1x2 (the template: gemm_sm90_impl.cuh; picked per call in gemm_sm90.cu).
#include "gemm_sm90_impl.cuh"

namespace jint4 {
namespace cuda {

#if defined(JINT4_HAVE_SM90_GEMM)
JINT4_SM90_GEMM_CONFIG(Sm90Gemm256x128C2x1, 256, 128, 2, 1, Cooperative)
JINT4_SM90_GEMM_CONFIG(Sm90Gemm256x128C1x2, 256, 128, 1, 2, Cooperative)
#endif

}  // namespace cuda
}  // namespace jint4
