// sm_90a INT8 GEMM config: CTA tile 128x256x128, cluster 2x1, cooperative
// (the template: gemm_sm90_impl.cuh; picked per call in gemm_sm90.cu).
#include "gemm_sm90_impl.cuh"

namespace jint4 {
namespace cuda {

#if defined(JINT4_HAVE_SM90_GEMM)
JINT4_SM90_GEMM_CONFIG(Sm90Gemm128x256C2x1, 128, 256, 2, 1, Cooperative)
#endif

}  // namespace cuda
}  // namespace jint4
