// Flash attention forward (the FlashAttention-2 loop): one block per (kFwdM queries, batch, head); each warp owns
// kFwdMTiles tiles of 16 query rows and streams kFwdN-key tiles of K and V through shared memory, every K and V
// fragment it reads serving all of its tiles. Softmax is online in base 2 (scale * log2(e) folded into the scores);
// the output is rescaled when the running max grows by more than a factor 2^8 and divided by the row sum once at the
// end. Saves each row's max and log2(sum) (AttentionParams::row_max, row_log_sum). A row whose keys are all masked
// keeps max = -inf and sum = 0: it writes zeros, max -inf and log sum 0. DROPOUT: the probabilities enter P V dropped
// (after the row sums have counted them, as dropout follows the softmax). Causal and a local window limit the key
// tiles a block visits (visible_keys). CAP: scale_and_mask caps the scores (softcap). Neither the cap nor the
// window is compiled with DROPOUT, nor are packed sequences (AttentionParams::cu_seq_q), whose blocks each work on
// their own sequence (for_sequence), sized by the longest: a block past its sequence's rows has nothing to do.
// PAGED: K and V tiles come from a paged KV cache's pages (load_keys); a template flag, as the plain kernels near
// 255 registers spill more with the indirection compiled in beside their own loads.
// Copies overlap the math with one K and one V buffer: V_j lands while S = Q K_j^T and the softmax run, and
// K_{j+1} while O += P V_j runs; the two barriers per step order each buffer's reads before its next copy.
#pragma once

#include "kernel_traits.h"
#include "primitives.cuh"

namespace fa {

template <typename T, int D, bool DROPOUT, bool CAP, bool PAGED = false>
__global__ void __launch_bounds__(AttnTraits<D>::kThreads) attention_fwd_kernel(const AttentionParams params) {
  static_assert(!(DROPOUT && CAP), "dropout and the logit cap are not compiled together");
  static_assert(!(DROPOUT && PAGED), "nor dropout and a paged KV cache (inference)");
  constexpr bool WINDOW = !DROPOUT;  // nor dropout and the window
  using Tr = AttnTraits<D>;
  constexpr int MT = Tr::kFwdMTiles, BM = Tr::kFwdM, BN = Tr::kFwdN, P = Tr::kPitch, NT = Tr::kThreads;
  constexpr int WM = 16 * MT;  // query rows per warp
  static_assert(BM == WM * Tr::kWarps, "the warps' rows tile the block");
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * P;
  T* sV = sK + BN * P;

  const int m_blocks = (params.q_len + BM - 1) / BM;
  // Causal: a block further down has more keys to visit. Each head's blocks start from the last, so the grid's
  // tail is light blocks (longest first); a head's blocks still run side by side, sharing K and V in L2.
  const int m0 = (m_blocks - 1 - blockIdx.x % m_blocks) * BM;
  const int bh = blockIdx.x / m_blocks;
  const int b = bh / params.heads, h = bh % params.heads, hk = h / (params.heads / params.kv_heads);
  const AttentionParams p = for_sequence<T, !DROPOUT>(params, b);  // packed sequences: sequence b's own
  if (m0 >= p.q_len) return;  // past a packed sequence shorter than the longest
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  // Causal or a window: the key tiles outside [n_begin, n_end) are masked for every row of the block.
  const Span keys = visible_keys<WINDOW>(p, m0, m0 + BM, BN);
  const int n_begin = keys.lo, n_end = keys.hi;
  load_tile<T, D, BM, NT>(sQ, q, p.q_row_stride, m0, p.q_len);
  cp_async_commit();
  if (n_begin < n_end) {
    load_keys<T, D, BN, NT, PAGED>(sK, params, b, k, p.k_row_stride, params.k_page_stride, n_begin, p.k_len);
    cp_async_commit();
  }

  const int warp_m0 = m0 + warp * WM;
  const int row_lo = warp_m0 + lane / 4;  // this thread's rows: row_lo + 16 mt and row_lo + 16 mt + 8
  const T* sQw = sQ + warp * WM * P;
  const float scale2 = p.scale * kLog2e;
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) row_max[mt][0] = row_max[mt][1] = -kInf, row_sum[mt][0] = row_sum[mt][1] = 0.f;
  float acc[MT][D / 8][4] = {};
  uint32_t qf[Tr::kFwdQInRegs ? MT : 1][Tr::kFwdQInRegs ? D / 16 : 1][4];

  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    cp_async_wait<0>();  // K_j (and Q at first) has landed ...
    __syncthreads();     // ... for every thread, and every warp is done with V_{j-1}: sV is free
    load_keys<T, D, BN, NT, PAGED>(sV, params, b, v, p.v_row_stride, params.v_page_stride, n0, p.k_len);
    cp_async_commit();  // V_j lands during Q K_j^T and the softmax

    float s[MT][BN / 8][4] = {};  // S = Q K^T
    if constexpr (Tr::kFwdQInRegs) {
      if (n0 == n_begin) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) load_a<D, P>(qf[mt], sQw + mt * 16 * P, lane);
      }
      mma_rs_bt_m<T, D, BN, P, MT>(s, qf, sK, lane);
    } else {
      mma_ss_bt_m<T, D, BN, P, MT>(s, sQw, sK, lane);
    }
    // Tile mt's slot (nt, e): {query row, key col, head}, for scale_and_mask and dropout.
    const auto slot = [&](int mt) {
      return [&, mt](int nt, int e) {
        return make_int3(row_lo + mt * 16 + (e / 2) * 8, n0 + frag_col(lane, nt, e), h);
      };
    };
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      scale_and_mask<T, false, CAP, WINDOW>(s[mt], p, scale2, unmasked_tile<WINDOW>(p, warp_m0 + mt * 16, 16, n0, BN),
                                            b, slot(mt));

    online_softmax<MT, BN, D>(s, row_max, row_sum, acc);
    if constexpr (DROPOUT) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) dropout(s[mt], p, b, slot(mt));
    }

    cp_async_wait<0>();  // V_j has landed ...
    __syncthreads();     // ... for every thread, and every warp is done with K_j: sK is free
    if (n0 + BN < n_end) {
      load_keys<T, D, BN, NT, PAGED>(sK, params, b, k, p.k_row_stride, params.k_page_stride, n0 + BN, p.k_len);
      cp_async_commit();  // K_{j+1} lands during O += P V_j
    }
    mma_cs_m<T, BN, D, P, MT>(acc, s, sV, lane);  // O += P V
  }
  cp_async_wait<0>();  // the Q copy, when no key tile was visited

  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
  const int64_t stats = stats_offset(p, b, h);  // this head's rows in row_max and row_log_sum
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float sum = quad_sum(row_sum[mt][i]);
      const int row = row_lo + mt * 16 + i * 8;
      if (row >= p.q_len) continue;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        store2<T>(out + row * p.o_row_stride + dt * 8 + (lane % 4) * 2, acc[mt][dt][2 * i] * inv,
                  acc[mt][dt][2 * i + 1] * inv);
      if (lane % 4 == 0) {
        p.row_max[stats + row] = sum > 0.f ? row_max[mt][i] : -kInf;
        p.row_log_sum[stats + row] = sum > 0.f ? log2f(sum) : 0.f;
      }
    }
  }
}

}  // namespace fa
