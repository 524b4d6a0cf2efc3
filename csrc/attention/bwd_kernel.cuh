// Flash attention backward, deterministic (no atomics), in three kernels:
//   1. delta = rowsum(dO * O) per query row (fp32).
//   2. dK, dV: one block per (64 keys, batch, kv head). Each warp owns 16 keys and walks every query tile of
//      every query head of its group (GQA folds into the loop, so no K/V repeat and no cross-block sum):
//        P^T = exp2(S^T - max - log sum), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
//   3. dQ: one block per (64 queries, batch, head), walking the key tiles: dQ += dS K (and dS itself, the gradient
//      of a float mask that requires grad, when AttentionParams::dmask asks for it).
// Kernels 2 and 3 both recompute S and P from the saved row statistics (prob, primitives.cuh): twice the Q K^T work
// of a one-pass backward with atomic dQ, traded for bitwise-reproducible gradients. All accumulation is fp32; P and
// dS are rounded to the input dtype only as mma operands (as in the forward's P V).
// DROPOUT regenerates the forward's decisions (dropout_keep): dV takes the dropped P, and dP is dropped the same
// way before dS = P (dP - delta) (delta = rowsum(dO * O), O being the dropped output). CAP, the logit cap
// (softcap): dS takes the cap's slope too, 1 - tanh^2 of each score. Causal and a local window limit the tiles each
// block visits (visible_keys, visible_rows). Neither the cap nor the window is compiled with DROPOUT, nor are packed
// sequences, whose blocks each work on their own sequence (for_sequence) as in the forward.
#pragma once

#include "kernel_traits.h"
#include "primitives.cuh"

namespace fa {

// One warp per query row.
template <typename T, int D>
__global__ void __launch_bounds__(128) attention_bwd_delta_kernel(const AttentionParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int row = r % p.q_len;
  const int64_t bh = r / p.q_len;
  const int b = bh / p.heads, h = bh % p.heads;
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + row * p.o_row_stride;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + row * p.do_row_stride;
  float acc = 0.f;
#pragma unroll
  for (int c = lane; c < D; c += 32) acc += to_float(o[c]) * to_float(d[c]);
  acc = warp_reduce(acc, SumOp());
  if (lane == 0) p.delta[r] = acc;
}

template <typename T, int D, bool DROPOUT, bool CAP>
__global__ void __launch_bounds__(AttnTraits<D>::kThreads) attention_bwd_dkdv_kernel(const AttentionParams params) {
  static_assert(!(DROPOUT && CAP), "dropout and the logit cap are not compiled together");
  constexpr bool WINDOW = !DROPOUT;  // nor dropout and the window
  using Tr = AttnTraits<D>;
  constexpr int BN = Tr::kBwdN, BM = Tr::kBwdM, P = Tr::kPitch, NT = Tr::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * P;
  T* sQ = sV + BN * P;
  T* sdO = sQ + BM * P;
  RowStats* sStats = reinterpret_cast<RowStats*>(sdO + BM * P);  // the query tile's rows; P = 0 past q_len
  float* sDelta = reinterpret_cast<float*>(sStats + BM);

  const int n_blocks = (params.k_len + BN - 1) / BN;
  const int n0 = (blockIdx.x % n_blocks) * BN;  // causal: the first key blocks meet the most queries, and start first
  const int bhk = blockIdx.x / n_blocks;
  const int b = bhk / params.kv_heads, hk = bhk % params.kv_heads;
  const AttentionParams p = for_sequence<T, !DROPOUT>(params, b);  // packed sequences: sequence b's own
  if (n0 >= p.k_len) return;  // past a packed sequence shorter than the longest
  const int group = p.heads / p.kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  load_tile<T, D, BN, NT>(sK, k, p.k_row_stride, n0, p.k_len);
  load_tile<T, D, BN, NT>(sV, v, p.v_row_stride, n0, p.k_len);
  cp_async_commit();

  const int key_lo = n0 + warp * 16 + lane / 4;  // this thread's keys: key_lo and key_lo + 8
  const float scale2 = p.scale * kLog2e;
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  // Causal or a window: the query tiles outside [m_begin, m_end) see none of this block's keys.
  const Span rows = visible_rows<WINDOW>(p, n0, n0 + BN, BM);
  const int m_begin = rows.lo, m_end = rows.hi;

  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
    const int64_t stats = stats_offset(p, b, h);  // this head's rows
    const float* delta = p.delta + stats;
    for (int m0 = m_begin; m0 < m_end; m0 += BM) {
      load_tile<T, D, BM, NT>(sQ, q, p.q_row_stride, m0, p.q_len);
      load_tile<T, D, BM, NT>(sdO, dout, p.do_row_stride, m0, p.q_len);
      cp_async_commit();
      for (int t = threadIdx.x; t < BM; t += NT) {
        const bool in = m0 + t < p.q_len;
        sStats[t] = row_stats(p, stats + m0 + t, in);
        sDelta[t] = in ? delta[m0 + t] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

      float dpt[BM / 8][4] = {};  // dP^T = V dO^T
      if constexpr (CAP) {  // dP^T - delta first, so that the cap's slope joins it as the scores are capped
        mma_ss_bt<T, D, BM, P>(dpt, sV + warp * 16 * P, sdO, lane);
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dpt[nt][e] -= sDelta[frag_col(lane, nt, e)];
        }
      }
      float s[BM / 8][4] = {};  // S^T = K Q^T: 16 keys x BM queries per warp
      mma_ss_bt<T, D, BM, P>(s, sK + warp * 16 * P, sQ, lane);
      scale_and_mask<T, false, CAP, WINDOW>(
          s, p, scale2, unmasked_tile<WINDOW>(p, m0, BM, n0 + warp * 16, 16), b,
          [&](int nt, int e) { return make_int3(m0 + frag_col(lane, nt, e), key_lo + (e / 2) * 8, h); },
          [&](int nt, int e, float slope) { dpt[nt][e] *= slope; });
#pragma unroll
      for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = prob(s[nt][e], sStats[frag_col(lane, nt, e)]);
      }
      // Dropout: this thread's decisions as bits (slot (nt, e) at bit 4 nt + e), for dV's P and for dP.
      static_assert(BM / 8 * 4 <= 32, "a thread's slots fit one word of decisions");
      uint32_t kept = 0;
      if constexpr (DROPOUT) {
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            kept |= uint32_t{dropout_keep(p, b, h, m0 + frag_col(lane, nt, e), key_lo + (e / 2) * 8)} << (4 * nt + e);
        }
      }
      const auto dropped = [&](int nt, int e, float v) {
        return !DROPOUT ? v : (kept >> (4 * nt + e) & 1u) ? v * p.dropout_scale : 0.f;
      };
      mma_cs<T, BM, D, P>(dv, s, sdO, lane, dropped);  // dV += P^T dO (P dropped)

      if constexpr (!CAP) mma_ss_bt<T, D, BM, P>(dpt, sV + warp * 16 * P, sdO, lane);
#pragma unroll
      for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e)  // dS^T = P^T (dP^T - delta), dP^T dropped
          s[nt][e] *= CAP ? dpt[nt][e] : dropped(nt, e, dpt[nt][e]) - sDelta[frag_col(lane, nt, e)];
      }
      mma_cs<T, BM, D, P>(dk, s, sQ, lane);  // dK += dS^T Q
      __syncthreads();  // every warp is done with this Q / dO tile before the next overwrites it
    }
  }
  cp_async_wait<0>();  // the K / V copy, when no query tile was visited

  T* dk_out = static_cast<T*>(p.dk) + b * p.dkv_batch_stride + hk * p.dkv_head_stride;
  T* dv_out = static_cast<T*>(p.dv) + b * p.dkv_batch_stride + hk * p.dkv_head_stride;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int key = key_lo + i * 8;
    if (key >= p.k_len) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int64_t at = key * p.dkv_row_stride + dt * 8 + (lane % 4) * 2;
      store2<T>(dk_out + at, dk[dt][2 * i] * p.scale, dk[dt][2 * i + 1] * p.scale);
      store2<T>(dv_out + at, dv[dt][2 * i], dv[dt][2 * i + 1]);
    }
  }
}

template <typename T, int D, bool DROPOUT, bool CAP>
__global__ void __launch_bounds__(AttnTraits<D>::kThreads) attention_bwd_dq_kernel(const AttentionParams params) {
  static_assert(!(DROPOUT && CAP), "dropout and the logit cap are not compiled together");
  constexpr bool WINDOW = !DROPOUT;  // nor dropout and the window
  using Tr = AttnTraits<D>;
  constexpr int BM = Tr::kDqM, BN = Tr::kDqN, P = Tr::kPitch, NT = Tr::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + BM * P;
  T* sK = sdO + BM * P;
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
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  // Copies overlap the math with one K and one V buffer: each step computes dP = dO V_j^T first, so V_{j+1}
  // lands during S, dS and dQ += dS K_j, and K_{j+1} during the next dP. Two copy groups are in flight at each
  // step's start, V (older) then K.
  const Span keys = visible_keys<WINDOW>(p, m0, m0 + BM, BN);  // causal or a window: the key tiles these rows see
  const int n_begin = keys.lo, n_end = keys.hi;
  load_tile<T, D, BM, NT>(sQ, q, p.q_row_stride, m0, p.q_len);
  load_tile<T, D, BM, NT>(sdO, dout, p.do_row_stride, m0, p.q_len);
  if (n_begin < n_end) load_tile<T, D, BN, NT>(sV, v, p.v_row_stride, n_begin, p.k_len);
  cp_async_commit();
  if (n_begin < n_end) load_tile<T, D, BN, NT>(sK, k, p.k_row_stride, n_begin, p.k_len);
  cp_async_commit();

  const int row_lo = m0 + warp * 16 + lane / 4;
  const float scale2 = p.scale * kLog2e;
  const int64_t head_rows = stats_offset(p, b, h);  // this head's rows in the statistics and delta
  RowStats stats[2];
  float delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = row_lo + i * 8;
    const bool in = row < p.q_len;
    stats[i] = row_stats(p, head_rows + row, in);
    delta[i] = in ? p.delta[head_rows + row] : 0.f;
  }
  float dq[D / 8][4] = {};

  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    cp_async_wait<1>();  // V_j (and Q, dO at first) has landed; K_j may still be in flight
    __syncthreads();
    float dp[BN / 8][4] = {};  // dP = dO V^T
    mma_ss_bt<T, D, BN, P>(dp, sdO + warp * 16 * P, sV, lane);
    cp_async_wait<0>();  // K_j has landed ...
    __syncthreads();     // ... for every thread, and every warp is done with V_j: sV is free
    if (n0 + BN < n_end) load_tile<T, D, BN, NT>(sV, v, p.v_row_stride, n0 + BN, p.k_len);
    cp_async_commit();   // V_{j+1} (an empty group on the last step keeps the count at two)

    float s[BN / 8][4] = {};  // S = Q K^T
    mma_ss_bt<T, D, BN, P>(s, sQ + warp * 16 * P, sK, lane);
    const auto slot = [&](int nt, int e) { return make_int3(row_lo + (e / 2) * 8, n0 + frag_col(lane, nt, e), h); };
    const bool interior = unmasked_tile<WINDOW>(p, m0 + warp * 16, 16, n0, BN);
    if constexpr (CAP) {  // as in dK/dV: dP - delta first, so that the cap's slope joins it as the scores are capped
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[nt][e] -= delta[e / 2];
      }
      scale_and_mask<T, BN == 64, true, WINDOW>(s, p, scale2, interior, b, slot,
                                                [&](int nt, int e, float slope) { dp[nt][e] *= slope; });
    } else {
      scale_and_mask<T, BN == 64, false, WINDOW>(s, p, scale2, interior, b, slot);
      if constexpr (DROPOUT) dropout(dp, p, b, slot);  // dP dropped as the forward dropped P
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // dS = P (dP - delta)
        s[nt][e] = prob(s[nt][e], stats[e / 2]) * (CAP ? dp[nt][e] : dp[nt][e] - delta[e / 2]);
      }
    }
    if (!CAP && p.dmask != nullptr) {  // a float mask that requires grad: dS is its gradient (the binding: no cap)
      float* dmask = p.dmask + static_cast<int64_t>(bh) * p.q_len * p.k_len;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int3 at = slot(nt, e);
          if (at.x < p.q_len && at.y < p.k_len) dmask[static_cast<int64_t>(at.x) * p.k_len + at.y] = s[nt][e];
        }
      }
    }
    mma_cs<T, BN, D, P>(dq, s, sK, lane);  // dQ += dS K
    __syncthreads();  // every warp is done with K_j: sK is free
    if (n0 + BN < n_end) load_tile<T, D, BN, NT>(sK, k, p.k_row_stride, n0 + BN, p.k_len);
    cp_async_commit();  // K_{j+1}
  }
  cp_async_wait<0>();

  T* dq_out = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = row_lo + i * 8;
    if (row >= p.q_len) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      store2<T>(dq_out + row * p.dq_row_stride + dt * 8 + (lane % 4) * 2, dq[dt][2 * i] * p.scale,
                dq[dt][2 * i + 1] * p.scale);
  }
}

}  // namespace fa
