// The bwd attention instantiation for head dim 80, bf16.
#include "launch_template.cuh"

namespace fa {
template int run_attention_bwd<__nv_bfloat16, 80>(const AttentionParams&, cudaStream_t);
}  // namespace fa
