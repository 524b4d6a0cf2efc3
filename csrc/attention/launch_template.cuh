// Launchers of one (dtype, head dim) instantiation. Included only by the per-instantiation .cu files
// (fwd_hdim64_fp16.cu, ...), which nvcc compiles in parallel.
#pragma once

#include "../common/static_switch.h"
#include "bwd_kernel.cuh"
#include "decode_kernel.cuh"
#include "fwd_kernel.cuh"
#include "instances.h"

namespace fa {

namespace detail {

// Grids are flattened to x (up to 2^31 - 1 blocks): y and z are limited to 65535, less than B * H may be.
inline bool grid_fits(int64_t blocks) { return blocks > 0 && blocks <= 2147483647; }

template <typename Kernel, typename... Args>
int launch_with_smem(Kernel kernel, int64_t blocks, int threads, int smem, cudaStream_t stream, const Args&... args) {
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  // Above 48 KiB of dynamic shared memory a kernel must opt in (sm_80 allows up to 163 KiB, sm_90 227 KiB).
  if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) return err;
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace detail

// Decoding: the split-KV kernel, then (with several splits) the merge of its parts.
template <typename T, int D>
int run_attention_decode(const AttentionParams& p, const DecodePlan& plan, cudaStream_t stream) {
  AttentionParams q = p;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  if (plan.splits > 1) {
    q.split_max = q.split_out + plan.splits * rows * D;
    q.split_log_sum = q.split_max + plan.splits * rows;
  }
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.kv_heads * plan.row_groups * plan.splits;
  const auto launch = [&](auto kernel) {
    return detail::launch_with_smem(kernel, blocks, 32 * plan.warps, decode_smem_bytes<D>(plan.warps), stream, q,
                                    plan);
  };
  const int err = p.block_table != nullptr ? launch(attention_decode_kernel<T, D, true, true>)  // a paged KV cache
                  : p.cu_seq_q != nullptr  ? launch(attention_decode_kernel<T, D, true, false>)
                                           : launch(attention_decode_kernel<T, D, false, false>);
  if (err) return err;
  if (plan.splits == 1) return cudaSuccess;
  if (!detail::grid_fits(rows)) return cudaErrorInvalidConfiguration;
  attention_decode_combine_kernel<T, D><<<static_cast<unsigned>(rows), 32, 0, stream>>>(q, plan);
  return cudaGetLastError();
}

template <typename T, int D>
int run_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Tr = AttnTraits<D>;
  if (const DecodePlan plan = decode_plan(p); plan.splits > 0) return run_attention_decode<T, D>(p, plan, stream);
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.heads * ((p.q_len + Tr::kFwdM - 1) / Tr::kFwdM);
  const auto launch = [&](auto kernel) {
    return detail::launch_with_smem(kernel, blocks, Tr::kThreads, Tr::template fwd_smem<T>(), stream, p);
  };
  if (p.block_table != nullptr)  // a paged KV cache: never with dropout (inference)
    return FA_BOOL_SWITCH(p.softcap != 0.f, CAP, [&] { return launch(attention_fwd_kernel<T, D, false, CAP, true>); });
  if (p.softcap != 0.f) return launch(attention_fwd_kernel<T, D, false, true>);  // never with dropout (the binding)
  return FA_BOOL_SWITCH(p.dropout_p > 0.f, DROPOUT, [&] { return launch(attention_fwd_kernel<T, D, DROPOUT, false>); });
}

template <typename T, int D>
int run_attention_bwd(const AttentionParams& p, cudaStream_t stream) {
  using Tr = AttnTraits<D>;
  // The delta kernel walks the rows as (B, H, Lq); packed sequences' (H, total_q) are one batch of total_q rows.
  AttentionParams all_rows = p;
  if (p.cu_seq_q != nullptr) all_rows.batch = 1, all_rows.q_len = p.total_q, all_rows.cu_seq_q = nullptr;
  const int64_t rows = static_cast<int64_t>(all_rows.batch) * p.heads * all_rows.q_len;
  if (!detail::grid_fits((rows + 3) / 4)) return cudaErrorInvalidConfiguration;
  attention_bwd_delta_kernel<T, D><<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(all_rows);
  if (cudaError_t err = cudaGetLastError()) return err;

  const int64_t kv_blocks = static_cast<int64_t>(p.batch) * p.kv_heads * ((p.k_len + Tr::kBwdN - 1) / Tr::kBwdN);
  const int64_t q_blocks = static_cast<int64_t>(p.batch) * p.heads * ((p.q_len + Tr::kDqM - 1) / Tr::kDqM);
  const auto launch = [&](auto dkdv, auto dq) {
    if (int err = detail::launch_with_smem(dkdv, kv_blocks, Tr::kThreads, Tr::template dkdv_smem<T>(), stream, p))
      return err;
    return detail::launch_with_smem(dq, q_blocks, Tr::kThreads, Tr::template dq_smem<T>(), stream, p);
  };
  if (p.softcap != 0.f)  // never with dropout (the binding refuses it)
    return launch(attention_bwd_dkdv_kernel<T, D, false, true>, attention_bwd_dq_kernel<T, D, false, true>);
  return FA_BOOL_SWITCH(p.dropout_p > 0.f, DROPOUT, [&] {
    return launch(attention_bwd_dkdv_kernel<T, D, DROPOUT, false>, attention_bwd_dq_kernel<T, D, DROPOUT, false>);
  });
}

}  // namespace fa
