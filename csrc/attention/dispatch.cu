// Runtime dtype and head dim -> the compiled instantiation (see instances.h). The binding has already checked
// that the head dim is one of kHeadDims; anything else here is a programming error, reported as such.
#include "../common/static_switch.h"
#include "instances.h"

namespace fa {

#define FA_HEADDIM_CASE(HEAD_DIM, VALUE, D, ...) \
  if (HEAD_DIM == VALUE) {                        \
    constexpr static int D = VALUE;               \
    return __VA_ARGS__();                         \
  }

// Keep in step with kHeadDims (flash.h) and the instantiation files.
#define FA_HEADDIM_SWITCH(HEAD_DIM, D, ...)         \
  [&] {                                             \
    FA_HEADDIM_CASE(HEAD_DIM, 32, D, __VA_ARGS__)   \
    FA_HEADDIM_CASE(HEAD_DIM, 64, D, __VA_ARGS__)   \
    FA_HEADDIM_CASE(HEAD_DIM, 96, D, __VA_ARGS__)   \
    FA_HEADDIM_CASE(HEAD_DIM, 128, D, __VA_ARGS__)  \
    return static_cast<int>(cudaErrorInvalidValue); \
  }()

int attention_forward(const AttentionParams& p, cudaStream_t stream) {
  return FA_HALF_DTYPE_SWITCH(p.dtype, T,
                              [&] { return FA_HEADDIM_SWITCH(p.head_dim, D, [&] { return run_attention_fwd<T, D>(p, stream); }); });
}

int attention_backward(const AttentionParams& p, cudaStream_t stream) {
  return FA_HALF_DTYPE_SWITCH(p.dtype, T,
                              [&] { return FA_HEADDIM_SWITCH(p.head_dim, D, [&] { return run_attention_bwd<T, D>(p, stream); }); });
}

}  // namespace fa
