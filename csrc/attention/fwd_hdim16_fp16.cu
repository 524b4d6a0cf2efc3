// The fwd attention instantiation for head dim 16, fp16.
#include "launch_template.cuh"

namespace fa {
template int run_attention_fwd<__half, 16>(const AttentionParams&, cudaStream_t);
}  // namespace fa
