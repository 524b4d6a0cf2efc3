// Flash-decoding: a few queries (q_len <= kDecodeMaxQ) against a long KV cache. The tiled forward would run one
// 128-query block per (batch, head), most of its rows empty, each streaming the whole cache on its own: on the
// H200 that read the cache at 200 GB/s. Here a block is one to kDecodeMaxWarps warps, and the work is cut finer:
// - GQA packing: the rows of a block are the queries of every head that shares one kv head (row r is query
//   r % q_len of head kv_head * group + r / q_len), 16 per warp, so each K and V tile is read once per group
//   (up to 64 rows) instead of once per query head.
// - Split-KV: the keys are cut into `splits` ranges, one block each, so that the grid fills the GPU. Each writes
//   its rows' output normalized on its own range plus their max and log sum, base 2 and apart (their sum cannot
//   resolve the log sum when the max is huge: a row masked with finfo.min); attention_decode_combine_kernel
//   merges them, weighting each part by its share of the row's sum. With one split the block writes the result
//   itself.
// Packed sequences (fa.varlen_attn serving a batch of KV caches: AttentionParams::cu_seq_q, seqused_k): the grid
// is sized by the longest sequence (q_len, k_len), and each block works on its own sequence (for_sequence): its
// queries, its keys, its window aligned bottom-right (causal is the window (-1, 0)). The splits cut the keys that
// its queries may see under the window (visible_keys), so a sliding window reads only its span of the cache;
// blocks past a shorter sequence's rows return at once, splits past its keys write empty parts. PAGED: K and V
// rows come through the block table, as in the forward's load_keys. Both are template flags (PAGED implies
// PACKED): compiled into every call, the per-sequence lengths and window took the dense kernel at D 64 from 94
// registers to 126 (ptxas, sm_90); the dense kernels are compiled as before.
// K and V tiles stream through decode_stages<D>() shared-memory buffers with cp.async, so the next tiles load
// while the warps compute on one. The math is the forward's: S = Q K^T with Q's fragments in registers, the
// online softmax of primitives.cuh, O += P V.
#pragma once

#include "primitives.cuh"

namespace fa {

constexpr int kDecodeMaxQ = 16;       // queries per head at most
constexpr int kDecodeMinKeys = 1024;  // keys at least
constexpr int kDecodeRows = 16;       // packed rows per warp: one mma tile
constexpr int kDecodeMaxWarps = 4;    // warps of a block, sharing its K and V tiles
constexpr int kDecodeN = 32;          // keys per tile
constexpr int kDecodeMinSplitKeys = 256;  // fewest keys per split: below that the merge costs more than it saves
constexpr int kDecodeMaxSplits = 128;
constexpr int kDecodeBlocksPerSm = 4;  // the grid aims at this many blocks per SM, each streaming its own keys

// K / V tile buffers per block: the tiles in flight while it computes are one fewer. With about 4 blocks per SM
// that is 64 KB of K and V loading per SM at D 128 (a tile of both is 17 KB), enough to cover the memory latency
// at full bandwidth; D 64's tiles are half as big, so it keeps two in flight.
template <int D>
__host__ __device__ constexpr int decode_stages() { return D <= 64 ? 3 : 2; }

template <int D>
__host__ __device__ constexpr int decode_smem_bytes(int warps) {
  return (warps * kDecodeRows + 2 * decode_stages<D>() * kDecodeN) * (D + 8) * 2;
}

// plan.warps warps a block; block ((b * kv_heads + kv_head) * plan.row_groups + row_group) * splits + split,
// where row group g holds rows 16 * warps * g onwards (16 a warp). `params` is the call's (the grid's lengths, the
// parts' layout), p the block's sequence's (for_sequence; params itself for a dense call).
template <typename T, int D, bool PACKED = false, bool PAGED = false>
__global__ void __launch_bounds__(32 * kDecodeMaxWarps)
    attention_decode_kernel(const AttentionParams params, const DecodePlan plan) {
  constexpr int BN = kDecodeN, P = D + 8, S = decode_stages<D>();
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // 16 rows a warp
  T* sK = sQ + plan.warps * kDecodeRows * P;  // S buffers of BN rows, then V's
  T* sV = sK + S * BN * P;

  const int split = blockIdx.x % plan.splits;
  const int row_group = blockIdx.x / plan.splits % plan.row_groups;
  const int bk = blockIdx.x / plan.splits / plan.row_groups;
  const int b = bk / params.kv_heads, hk = bk % params.kv_heads;
  static_assert(PACKED || !PAGED, "a paged KV cache is a packed call's");
  const AttentionParams p = for_sequence<T, PACKED>(params, b);
  const int group = p.heads / p.kv_heads, rows = group * p.q_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int block_r0 = row_group * plan.warps * kDecodeRows, r0 = block_r0 + warp * kDecodeRows;
  if (block_r0 >= rows) return;  // past a packed sequence with fewer queries than the longest

  // Q's packed rows, D / 8 16-byte pieces each; rows past the group's are zeros
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;
  for (int c = threadIdx.x; c < plan.warps * kDecodeRows * (D / 8); c += blockDim.x) {
    const int r = c / (D / 8), col = (c % (D / 8)) * 8;
    const int row = block_r0 + r, h = hk * group + row / p.q_len, i = row % p.q_len;
    const bool valid = row < rows;
    cp_async_16(sQ + r * P + col, valid ? q + h * p.q_head_stride + i * p.q_row_stride + col : q, valid);
  }

  // This split's keys: whole tiles of the keys the queries may see (all of them but under a packed call's window).
  // 64-bit: lo + keys_per_split could pass 2^31 with k_len just under it.
  const Span keys = PACKED ? visible_keys(p, 0, p.q_len, BN) : Span{0, p.k_len};
  const int64_t first = keys.lo + int64_t{split} * plan.keys_per_split;
  const int lo = static_cast<int>(min(first, int64_t{keys.hi}));
  const int hi = static_cast<int>(min(first + plan.keys_per_split, int64_t{keys.hi}));
  const int tiles = (hi - lo + BN - 1) / BN;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const int* table = PAGED ? params.block_table + b * params.block_table_stride : nullptr;
  // Tile t of K and V into buffer t % S, by every thread of the block. Not load_tile's fully unrolled loop: for
  // one warp that kept the 32 source addresses of a tile live across the key loop (ptxas, sm_90, D 128: 255
  // registers and a spill; 166 and none so). PAGED: key j is row j % page_size of page table[j / page_size].
  const auto load_kv = [&](int t) {
#pragma unroll 4
    for (int i = threadIdx.x; i < BN * (D / 8); i += blockDim.x) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8;
      const int key = lo + t * BN + r;
      const bool valid = key < p.k_len;
      int64_t k_at = int64_t{key} * params.k_row_stride, v_at = int64_t{key} * params.v_row_stride;
      if constexpr (PAGED) {
        const int64_t page = valid ? table[key / params.page_size] : 0, row = key % params.page_size;
        k_at = page * params.k_page_stride + row * params.k_row_stride;
        v_at = page * params.v_page_stride + row * params.v_row_stride;
      }
      cp_async_16(sK + ((t % S) * BN + r) * P + c, valid ? k + k_at + c : k, valid);
      cp_async_16(sV + ((t % S) * BN + r) * P + c, valid ? v + v_at + c : v, valid);
    }
  };
  // Group t holds tile t (and Q with tile 0); every stage commits one, empty or not, so the count stays fixed.
#pragma unroll
  for (int t = 0; t < S - 1; ++t) {
    if (t < tiles) load_kv(t);
    cp_async_commit();
  }

  const float scale2 = p.scale * kLog2e;
  float row_max[1][2] = {{-kInf, -kInf}}, row_sum[1][2] = {{0.f, 0.f}};
  float acc[1][D / 8][4] = {};
  uint32_t qf[1][D / 16][4];
  // A tile is interior when no score in it needs a test: no mask, not causal (decode_plan sends dense causal calls
  // to the tiled forward), inside every query's window (packed), every key below k_len. Splits are whole tiles: no
  // tile reaches into the next split. The logit cap (softcap) is scale_and_mask's.
  const bool plain = p.mask_kind == MaskKind::kNone && !p.causal;
  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<S - 2>();  // tile t has landed for this thread ...
    __syncthreads();         // ... and for every thread, all of which are done with tile t - 1's buffer
    if (t + S - 1 < tiles) load_kv(t + S - 1);
    cp_async_commit();
    if (t == 0) load_a<D, P>(qf[0], sQ + warp * kDecodeRows * P, lane);

    const int n0 = lo + t * BN;
    float s[1][BN / 8][4] = {};
    mma_rs_bt_m<T, D, BN, P, 1>(s, qf, sK + (t % S) * BN * P, lane);
    // A packed row is (head, query); the rows past the group's go to query q_len, which masked_score masks.
    const bool interior = PACKED ? unmasked_tile(p, 0, p.q_len, n0, BN) : plain && n0 + BN <= p.k_len;
    scale_and_mask<T>(s[0], p, scale2, interior, b, [&](int nt, int e) {
      const int row = r0 + frag_row(lane, e);
      return row < rows ? make_int3(row % p.q_len, n0 + frag_col(lane, nt, e), hk * group + row / p.q_len)
                        : make_int3(p.q_len, 0, hk * group);
    });
    online_softmax<1, BN, D>(s, row_max, row_sum, acc);
    mma_cs_m<T, BN, D, P, 1>(acc, s, sV + (t % S) * BN * P, lane);
  }
  cp_async_wait<0>();  // the Q copy, when this split has no keys

  // The parts are (splits, B, H, Lq) with the grid's Lq (params.q_len): rows before this split's, then (b, h, qi)
  const int64_t part = static_cast<int64_t>(split) * params.batch * params.heads * params.q_len;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float sum = quad_sum(row_sum[0][i]);
    const int row = r0 + lane / 4 + i * 8;
    if (row >= rows) continue;
    const int h = hk * group + row / p.q_len, qi = row % p.q_len;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    if (plan.splits == 1) {
      T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + qi * p.o_row_stride;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        store2<T>(out + dt * 8 + (lane % 4) * 2, acc[0][dt][2 * i] * inv, acc[0][dt][2 * i + 1] * inv);
      if (lane % 4 == 0) {
        const int64_t at = stats_offset(p, b, h) + qi;
        p.row_max[at] = sum > 0.f ? row_max[0][i] : -kInf;
        p.row_log_sum[at] = sum > 0.f ? log2f(sum) : 0.f;
      }
    } else {
      const int64_t at = part + (static_cast<int64_t>(b) * params.heads + h) * params.q_len + qi;
      float* out = params.split_out + at * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<float2*>(out + dt * 8 + (lane % 4) * 2) =
            make_float2(acc[0][dt][2 * i] * inv, acc[0][dt][2 * i + 1] * inv);
      if (lane % 4 == 0) {
        // A NaN score (a NaN in the mask) makes the sum NaN: the max then carries it into the merge, which would
        // otherwise weigh this split 0, as one without keys, and drop the NaN that torch gives the row.
        params.split_max[at] = sum > 0.f ? row_max[0][i] : sum == 0.f ? -kInf : sum;
        params.split_log_sum[at] = sum > 0.f ? log2f(sum) : 0.f;
      }
    }
  }
}

// One warp per (b, h, query) of (B, H, Lq), the grid's lengths: out = sum over splits of w_s * part_s / total,
// w_s = exp2(max_s - m + log_sum_s) with m the largest max_s, total the sum of the w_s; the row's statistics are m
// and log2(total). A split without keys for the row (max_s = -inf) weighs 0; a row without any gives zeros, max
// -inf and log sum 0, as the tiled forward. A NaN (in the mask) makes the row NaN. Packed sequences: the warps past
// a sequence's queries return, and the row goes to its sequence's place in out and the statistics.
template <typename T, int D>
__global__ void __launch_bounds__(32) attention_decode_combine_kernel(const AttentionParams params,
                                                                      const DecodePlan plan) {
  constexpr int C = (D + 31) / 32;  // columns per lane
  const int64_t at = blockIdx.x;   // (b, h, qi) in (B, H, Lq)
  const int64_t rows = static_cast<int64_t>(params.batch) * params.heads * params.q_len;
  const int b = at / (static_cast<int64_t>(params.heads) * params.q_len), h = at / params.q_len % params.heads;
  const int qi = at % params.q_len;
  const AttentionParams p = for_sequence<T>(params, b);
  if (qi >= p.q_len) return;  // past a packed sequence's queries: no part was written
  const int lane = threadIdx.x;
  float m = -kInf;
  for (int s = lane; s < plan.splits; s += 32) m = fmaxf(m, p.split_max[s * rows + at]);
  m = warp_reduce(m, MaxOp());
  const float shift = m == -kInf ? 0.f : m;
  auto weight = [&](int s) { return exp2f(p.split_max[s * rows + at] - shift + p.split_log_sum[s * rows + at]); };
  float total = 0.f;
  for (int s = lane; s < plan.splits; s += 32) total += weight(s);
  total = warp_reduce(total, SumOp());
  float acc[C] = {};
  for (int s = 0; s < plan.splits; ++s) {
    const float w = weight(s);
    if (w == 0.f) continue;  // a split without keys for this row: its part is not read
    const float* part = p.split_out + (s * rows + at) * D;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (lane + 32 * c < D) acc[c] += w * part[lane + 32 * c];
    }
  }
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + qi * p.o_row_stride;
  const float inv = total > 0.f ? 1.f / total : total == 0.f ? 0.f : total;  // NaN stays NaN
#pragma unroll
  for (int c = 0; c < C; ++c) {
    if (lane + 32 * c < D) out[lane + 32 * c] = from_float<T>(acc[c] * inv);
  }
  if (lane == 0) {
    const int64_t stats = stats_offset(p, b, h) + qi;
    p.row_max[stats] = total > 0.f ? shift : total == 0.f ? -kInf : total;  // NaN stays NaN
    p.row_log_sum[stats] = total > 0.f ? log2f(total) : 0.f;
  }
}

}  // namespace fa
