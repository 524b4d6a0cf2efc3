// The fwd attention instantiation for head dim 128, bf16.
#include "launch_template.cuh"

namespace fa {
template int run_attention_fwd<__nv_bfloat16, 128>(const AttentionParams&, cudaStream_t);
}  // namespace fa
