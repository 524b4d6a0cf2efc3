// Runtime dtype and head dim -> the compiled instantiation (see instances.h), and how a decoding call is cut
// (decode_plan). The binding has already checked that the head dim is one of kHeadDims; anything else here is a
// programming error, reported as such.
#include <algorithm>

#include "../common/static_switch.h"
#include "decode_kernel.cuh"
#include "instances.h"

namespace fa {

// Decoding takes a few queries against at least kDecodeMinKeys keys, without dropout (the tiled forward has it).
// Dense calls: not causal (top-left causal, those queries see at most kDecodeMaxQ keys: one tile of the tiled
// forward) and without a window (the tiled forward visits only the key tiles it reaches). Packed sequences (q_len
// and k_len the longest's): with their window too, aligned bottom-right in each sequence (causal is (-1, 0)), the
// kernel splitting only the keys it reaches, so a bounded left side bounds the keys to split; num_splits as
// AttentionParams says (1: the tiled forward).
// The grid aims at kDecodeBlocksPerSm blocks per SM: the splits are as many as that takes, with at least
// kDecodeMinSplitKeys keys each, cut at whole tiles. A function of the shape and the SM count only, so the bits do
// not vary run to run.
DecodePlan decode_plan(const AttentionParams& p) {
  const bool packed = p.cu_seq_q != nullptr;
  if (p.causal || (p.window && !packed) || p.dropout_p > 0.f || (packed && p.num_splits == 1) ||
      p.q_len > kDecodeMaxQ || p.k_len < kDecodeMinKeys)
    return {0, 0, 0, 0};
  int64_t keys = p.k_len;
  if (p.window && p.window_left != kNoWindow)  // a sequence's queries see at most q_len + left keys
    keys = std::min<int64_t>(keys, int64_t{p.q_len} + p.window_left + kDecodeN);
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) || sms < 1) {
    cudaGetLastError();  // clear it: the launch checks cudaGetLastError
    sms = 1;
  }
  DecodePlan plan{};
  const int row_blocks = (p.heads / p.kv_heads * p.q_len + kDecodeRows - 1) / kDecodeRows;  // a warp each
  plan.warps = std::min(row_blocks, kDecodeMaxWarps);
  plan.row_groups = (row_blocks + plan.warps - 1) / plan.warps;
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.kv_heads * plan.row_groups;
  const int64_t most = std::min<int64_t>(kDecodeMaxSplits, (keys + kDecodeMinSplitKeys - 1) / kDecodeMinSplitKeys);
  const int64_t splits = p.num_splits > 1 ? p.num_splits
                                          : std::max<int64_t>(1, std::min<int64_t>(kDecodeBlocksPerSm * sms / blocks,
                                                                                   most));
  const int64_t per_split = (std::max<int64_t>(keys, 1) + splits - 1) / splits;
  plan.keys_per_split = static_cast<int>((per_split + kDecodeN - 1) / kDecodeN * kDecodeN);
  plan.splits = static_cast<int>((std::max<int64_t>(keys, 1) + plan.keys_per_split - 1) / plan.keys_per_split);
  return plan;
}

int64_t attention_forward_workspace_floats(const AttentionParams& p) {
  const DecodePlan plan = decode_plan(p);
  if (plan.splits <= 1) return 0;
  return static_cast<int64_t>(plan.splits) * p.batch * p.heads * p.q_len * (p.head_dim + 2);
}

#define FA_HEADDIM_CASE(HEAD_DIM, VALUE, D, ...) \
  if (HEAD_DIM == VALUE) {                        \
    constexpr static int D = VALUE;               \
    return __VA_ARGS__();                         \
  }

// Keep in step with kHeadDims (flash.h) and the instantiation files.
#define FA_HEADDIM_SWITCH(HEAD_DIM, D, ...)         \
  [&] {                                             \
    FA_HEADDIM_CASE(HEAD_DIM, 16, D, __VA_ARGS__)   \
    FA_HEADDIM_CASE(HEAD_DIM, 32, D, __VA_ARGS__)   \
    FA_HEADDIM_CASE(HEAD_DIM, 64, D, __VA_ARGS__)   \
    FA_HEADDIM_CASE(HEAD_DIM, 80, D, __VA_ARGS__)   \
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
