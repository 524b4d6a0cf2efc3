// Launchers of one (dtype, head dim) instantiation. Included only by the per-instantiation .cu files
// (fwd_hdim64_fp16.cu, ...), which nvcc compiles in parallel.
#pragma once

#include "bwd_kernel.cuh"
#include "fwd_kernel.cuh"
#include "instances.h"

namespace fa {

namespace detail {

// Grids are flattened to x (up to 2^31 - 1 blocks): y and z are limited to 65535, less than B * H may be.
inline bool grid_fits(int64_t blocks) { return blocks > 0 && blocks <= 2147483647; }

template <typename Kernel>
int launch_with_smem(Kernel kernel, int64_t blocks, int threads, int smem, const AttentionParams& p,
                     cudaStream_t stream) {
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
  // Above 48 KiB of dynamic shared memory a kernel must opt in (sm_80 allows up to 163 KiB, sm_90 227 KiB).
  if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)) return err;
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail

template <typename T, int D>
int run_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Tr = AttnTraits<D>;
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.heads * ((p.q_len + Tr::kFwdM - 1) / Tr::kFwdM);
  return detail::launch_with_smem(attention_fwd_kernel<T, D>, blocks, Tr::kThreads, Tr::template fwd_smem<T>(), p,
                                  stream);
}

template <typename T, int D>
int run_attention_bwd(const AttentionParams& p, cudaStream_t stream) {
  using Tr = AttnTraits<D>;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  if (!detail::grid_fits((rows + 3) / 4)) return cudaErrorInvalidConfiguration;
  attention_bwd_delta_kernel<T, D><<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(p);
  if (cudaError_t err = cudaGetLastError()) return err;

  const int64_t kv_blocks = static_cast<int64_t>(p.batch) * p.kv_heads * ((p.k_len + Tr::kBwdN - 1) / Tr::kBwdN);
  if (int err = detail::launch_with_smem(attention_bwd_dkdv_kernel<T, D>, kv_blocks, Tr::kThreads,
                                         Tr::template dkdv_smem<T>(), p, stream))
    return err;
  const int64_t q_blocks = static_cast<int64_t>(p.batch) * p.heads * ((p.q_len + Tr::kDqM - 1) / Tr::kDqM);
  return detail::launch_with_smem(attention_bwd_dq_kernel<T, D>, q_blocks, Tr::kThreads, Tr::template dq_smem<T>(),
                                  p, stream);
}

}  // namespace fa
