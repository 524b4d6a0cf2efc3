// Flash attention forward (the FlashAttention-2 loop): one block per (64 queries, batch, head); each warp owns
// 16 query rows, keeps its Q fragments in registers, and streams 64-key tiles of K and V through shared
// memory. Softmax is online in base 2 (scale * log2(e) folded into the scores); the output is rescaled when
// the running max grows and divided by the row sum once at the end. Saves lse = max + log(sum) in fp32.
// A row whose keys are all masked keeps max = -inf and sum = 0: it writes zeros and lse = -inf.
// Copies overlap the math with one K and one V buffer: V_j lands while S = Q K_j^T and the softmax run, and
// K_{j+1} while O += P V_j runs; the two barriers per step order each buffer's reads before its next copy.
#pragma once

#include "kernel_traits.h"
#include "primitives.cuh"

namespace fa {

template <typename T, int D>
__global__ void __launch_bounds__(AttnTraits<D>::kThreads) attention_fwd_kernel(const AttentionParams p) {
  using Tr = AttnTraits<D>;
  constexpr int BM = Tr::kFwdM, BN = Tr::kFwdN, P = Tr::kPitch, NT = Tr::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * P;
  T* sV = sK + BN * P;

  const int m_blocks = (p.q_len + BM - 1) / BM;
  const int m0 = (blockIdx.x % m_blocks) * BM;
  const int bh = blockIdx.x / m_blocks;
  const int b = bh / p.heads, h = bh % p.heads, hk = h / (p.heads / p.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  // Causal: keys past the block's last query are masked for every row of the block.
  const int n_end = p.causal ? min(p.k_len, m0 + BM) : p.k_len;
  load_tile<T, D, BM, NT>(sQ, q, p.q_row_stride, m0, p.q_len);
  cp_async_commit();
  if (n_end > 0) {
    load_tile<T, D, BN, NT>(sK, k, p.k_row_stride, 0, p.k_len);
    cp_async_commit();
  }

  const int row_lo = m0 + warp * 16 + lane / 4;  // this thread's rows: row_lo and row_lo + 8
  const float scale2 = p.scale * kLog2e;
  float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.f, 0.f};
  float acc[D / 8][4] = {};
  uint32_t qf[D / 16][4];

  for (int n0 = 0; n0 < n_end; n0 += BN) {
    cp_async_wait<0>();  // K_j (and Q at first) has landed ...
    __syncthreads();     // ... for every thread, and every warp is done with V_{j-1}: sV is free
    load_tile<T, D, BN, NT>(sV, v, p.v_row_stride, n0, p.k_len);
    cp_async_commit();  // V_j lands during Q K_j^T and the softmax
    if (n0 == 0) load_a<D, P>(qf, sQ + warp * 16 * P, lane);

    float s[BN / 8][4] = {};  // S = Q K^T
    mma_rs_bt<T, D, BN, P>(s, qf, sK, lane);
    scale_and_mask<T>(s, p, scale2, unmasked_tile(p, m0 + warp * 16, 16, n0, BN), b, h,
                      [&](int nt, int e) { return make_int2(row_lo + (e / 2) * 8, n0 + frag_col(lane, nt, e)); });

#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -kInf;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a quad share a row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float new_max = fmaxf(row_max[i], mx);
      const float shift = new_max == -kInf ? 0.f : new_max;  // all masked so far: exp2(-inf - 0) = 0, not NaN
      const float rescale = fast_exp2(row_max[i] - shift);
      row_max[i] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          s[nt][2 * i + j] = fast_exp2(s[nt][2 * i + j] - shift);
          sum += s[nt][2 * i + j];
        }
      }
      row_sum[i] = row_sum[i] * rescale + sum;  // this lane's share; the quad is summed at the end
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        acc[dt][2 * i] *= rescale;
        acc[dt][2 * i + 1] *= rescale;
      }
    }

    cp_async_wait<0>();  // V_j has landed ...
    __syncthreads();     // ... for every thread, and every warp is done with K_j: sK is free
    if (n0 + BN < n_end) {
      load_tile<T, D, BN, NT>(sK, k, p.k_row_stride, n0 + BN, p.k_len);
      cp_async_commit();  // K_{j+1} lands during O += P V_j
    }
    mma_cs<T, BN, D, P>(acc, s, sV, lane);  // O += P V
  }
  cp_async_wait<0>();  // the Q copy, when no key tile was visited

  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
  float* lse = p.lse + static_cast<int64_t>(bh) * p.q_len;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = row_sum[i];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int row = row_lo + i * 8;
    if (row >= p.q_len) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      store2<T>(out + row * p.o_row_stride + dt * 8 + (lane % 4) * 2, acc[dt][2 * i] * inv, acc[dt][2 * i + 1] * inv);
    if (lane % 4 == 0) lse[row] = sum > 0.f ? (row_max[i] + log2f(sum)) * kLn2 : -kInf;
  }
}

}  // namespace fa
