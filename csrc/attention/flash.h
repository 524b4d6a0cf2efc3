// Parameters and launchers of fused attention. One plain struct describes a call (pointers, int64 strides in
// elements, sizes, flags); the binding fills it, the launchers pick the compiled instantiation.
//
// Shapes: q (B, H, Lq, D), k and v (B, Hkv, Lk, D), H % Hkv == 0 (query head h reads kv head h / (H / Hkv)); or
// packed sequences (AttentionParams::cu_seq_q): q (total_q, H, D), k and v (total_k, Hkv, D), or pools of pages
// (pages, page_size, Hkv, D) with a block table (AttentionParams::block_table).
// Preconditions the binding guarantees: dtype float16 or bfloat16, D in kHeadDims, last dim contiguous, every
// other stride and every base 16-byte aligned (so tiles load with 16-byte cp.async), sizes positive.
#pragma once

#include "../common/launch.h"

namespace fa {

// The head dims with a compiled kernel. Each costs one forward and one backward instantiation per dtype
// (about 5 s of nvcc per arch each). 256 is left out: its fp32 output tile alone is 128 registers per thread
// with these 64-row tiles, so it needs its own tile shapes.
constexpr int kHeadDims[] = {16, 32, 64, 80, 96, 128};

// A window side that bounds nothing (AttentionParams::window_left, window_right).
constexpr int kNoWindow = 2147483647;

enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2, kAny = -1 };  // kAny: kernels' "read it from p"

struct AttentionParams {
  DType dtype;
  int batch, heads, kv_heads, q_len, k_len, head_dim;
  float scale;  // softmax scale (1 / sqrt(D) by default); scores are scale * q . k
  bool causal;  // top-left aligned: query i sees keys j <= i
  // Packed sequences (fa.varlen_attn): B + 1 int32 offsets on the device, sequence b being rows cu_seq_q[b] ..
  // cu_seq_q[b + 1] - 1 of q, out, dout and dq and rows cu_seq_k[b] .. of k, v, dk and dv. The batch strides are then
  // 0, q_len and k_len the longest sequence's (they size the grid) and each block reads its own (for_sequence,
  // primitives.cuh); the window aligns bottom-right in each sequence (FlashAttention's varlen convention); the
  // statistics and delta are (H, total_q). No mask or dropout; decoding (decode_kernel.cuh) as for a dense call.
  // nullptr: dense.
  const int* cu_seq_q;
  const int* cu_seq_k;
  int total_q;
  // A KV cache's used keys (torch's seqused_k), forward only: B int32 counts on the device, sequence b's keys being
  // rows cu_seq_k[b] .. cu_seq_k[b] + seqused_k[b] - 1 (its Lk, to which its window aligns). nullptr: all of them.
  const int* seqused_k;
  // A paged KV cache (torch's block_table), forward only, with seqused_k: k and v are pools of pages, each page
  // page_size rows (k_row_stride apart) and pages k_page_stride (v_page_stride) elements apart; sequence b's key j
  // is row j % page_size of page block_table[b * block_table_stride + j / page_size]. cu_seq_k is not read.
  // nullptr: keys are rows of k and v.
  const int* block_table;
  int64_t block_table_stride, k_page_stride, v_page_stride;
  int page_size;
  // Packed sequences' key splits when decoding (torch's num_splits): 0 lets decode_plan choose; 1 never decodes,
  // the tiled forward running instead, whose tiles do not depend on the batch's lengths (each sequence's output
  // is then bitwise the same in any batch); n cuts the keys n ways (or fewer, in whole tiles). Dense calls: 0.
  int num_splits;
  // window: a local window (FlashAttention's window_size), top-left aligned as causal: query i sees keys
  // i - window_left .. i + window_right; kNoWindow on a side bounds nothing. The kernels visit only the key (or
  // query) tiles that the window reaches. False (as zero-initialized params have it): no window, sides unread.
  bool window;
  int window_left, window_right;
  // Gemma 2's logit cap c: the scores are c * tanh(scale * q.k / c) before the masks; 0: no cap. The backward
  // multiplies dS by the cap's slope 1 - tanh^2.
  float softcap;
  // Dropout on the probabilities (after the softmax, as torch's): each kept with 1 - dropout_p and scaled by
  // dropout_scale = 1 / (1 - dropout_p), or zeroed, as decided by dropout_keep (primitives.cuh) from `seed`.
  // dropout_p = 0: none. The forward and the backward of one call take the same seed.
  float dropout_p, dropout_scale;
  uint64_t seed;

  const void *q, *k, *v;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;

  // (B, H, Lq, Lk) read through strides (0 where broadcast): bool (True keeps) or additive in q's dtype.
  MaskKind mask_kind;
  const void* mask;
  int64_t mask_batch_stride, mask_head_stride, mask_q_stride, mask_k_stride;

  void* out;  // (B, H, Lq, D)
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  // Each query row's softmax statistics, (B, H, Lq) contiguous each (planes 0 and 1 of the op's (2, B, H, Lq)
  // stats): its max score and the log of its sum relative to that max, both base 2 (scores are scale * log2(e) *
  // q.k + log2(e) * mask); -inf and 0 for a row with every key masked. Kept apart because their sum cannot hold
  // the log sum where the max is huge (a row masked with finfo.min everywhere: torch's weights are uniform there).
  float* row_max;
  float* row_log_sum;
  // forward, decoding (decode_kernel.cuh) with several key splits: attention_forward_workspace_floats(p) floats of
  // fp32 scratch for the splits' parts, (splits, B, H, Lq, D), and then (the launcher sets the two pointers) their
  // rows' statistics, (splits, B, H, Lq) each, as row_max and row_log_sum
  float* split_out;
  float* split_max;
  float* split_log_sum;

  // backward
  const void* dout;  // (B, H, Lq, D)
  int64_t do_batch_stride, do_head_stride, do_row_stride;
  float* delta;  // (B, H, Lq) contiguous workspace: rowsum(dout * out)
  void *dq, *dk, *dv;  // shaped like q, k, v
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dkv_batch_stride, dkv_head_stride, dkv_row_stride;  // dk's and dv's
  // The additive mask's gradient, dS (B, H, Lq, Lk) contiguous fp32, zero-filled by the caller (the tiles causal or
  // a window skip stay 0); the dQ kernel writes each score's once. nullptr: not wanted. Not with the logit cap.
  float* dmask;
  float* weights;      // attention_weights: (B, H, Lq, Lk) contiguous float32
};

// How a forward call is cut for decoding (a few queries against many keys): `splits` key ranges of
// keys_per_split keys; the packed (GQA group x query) rows 16 a warp, `warps` warps a block sharing its K and V
// tiles, row_groups blocks per (batch, kv head, split). splits = 0: the tiled forward runs instead.
struct DecodePlan {
  int splits, keys_per_split, warps, row_groups;
};

DecodePlan decode_plan(const AttentionParams& p);
int64_t attention_forward_workspace_floats(const AttentionParams& p);
int attention_forward(const AttentionParams& p, cudaStream_t stream);
int attention_backward(const AttentionParams& p, cudaStream_t stream);
int attention_weights(const AttentionParams& p, cudaStream_t stream);

}  // namespace fa
