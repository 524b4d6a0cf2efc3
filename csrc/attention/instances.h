// Declarations of the compiled (dtype, head dim) instantiations; each is defined in its own .cu file so the
// build compiles them in parallel. Template count: 2 dtypes x |kHeadDims| x {forward, backward}, each plain, with
// dropout (one Philox draw per score) and with the logit cap (a tanh per score, and the backward's slope): template
// flags, so the plain kernels carry none of their registers; the two are never combined. The forward adds a paged
// KV cache's (block_table) kernels, plain and capped, for the same reason (sm_90, D 128: the plain kernel spills 64
// bytes, 128 with the table's indirection compiled in as a runtime branch). Causal, a local window,
// the mask kind and GQA are runtime flags read per tile: they cost a few instructions per score, not a template
// dimension (which would multiply the build by 6); the dropout kernels, near 255 registers, leave the window out.
#pragma once

#include "flash.h"

namespace fa {

template <typename T, int D>
int run_attention_fwd(const AttentionParams& p, cudaStream_t stream);

template <typename T, int D>
int run_attention_bwd(const AttentionParams& p, cudaStream_t stream);

}  // namespace fa
