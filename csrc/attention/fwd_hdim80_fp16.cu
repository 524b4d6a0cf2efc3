// The fwd attention instantiation for head dim 80, fp16.
#include "launch_template.cuh"

namespace fa {
template int run_attention_fwd<__half, 80>(const AttentionParams&, cudaStream_t);
}  // namespace fa
