// Declarations of the compiled (dtype, head dim) instantiations; each is defined in its own .cu file so the
// build compiles them in parallel. Template count: 2 dtypes x |kHeadDims| x {forward, backward}, each with and
// without dropout (one Philox draw per score: a template flag, so the kernels without it carry none of its
// registers). Causal, the mask kind and GQA are runtime flags read per tile: they cost a few instructions per
// score, not a template dimension (which would multiply the build by 6).
#pragma once

#include "flash.h"

namespace fa {

template <typename T, int D>
int run_attention_fwd(const AttentionParams& p, cudaStream_t stream);

template <typename T, int D>
int run_attention_bwd(const AttentionParams& p, cudaStream_t stream);

}  // namespace fa
