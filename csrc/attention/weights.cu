// attention_weights: P = softmax(scale * q k^T (capped) + mask) as float32 (B, H, Lq, Lk), rebuilt from the forward's
// statistics (prob, primitives.cuh), for need_weights=True. It materializes the Lq x Lk matrix anyway, so it is a
// plain CUDA-core kernel: one block per query row keeps the row in shared memory (fp32) and each thread computes
// whole dot products. Any head dim works here; rows with every key masked (max = -inf) give zeros.
#include "../common/static_switch.h"
#include "flash.h"
#include "primitives.cuh"

namespace fa {
namespace {

template <typename T>
__global__ void attention_weights_kernel(const AttentionParams p) {
  extern __shared__ float sq[];  // (head_dim,)
  const int64_t r = blockIdx.x;
  const int row = r % p.q_len;
  const int64_t bh = r / p.q_len;
  const int b = bh / p.heads, h = bh % p.heads, hk = h / (p.heads / p.kv_heads);
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + row * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) sq[d] = to_float(q[d]);
  __syncthreads();
  const RowStats stats = row_stats(p, r);
  float* out = p.weights + r * p.k_len;
  for (int col = threadIdx.x; col < p.k_len; col += blockDim.x) {
    const T* kr = k + col * p.k_row_stride;
    float dot = 0.f;
    for (int d = 0; d < p.head_dim; ++d) dot += sq[d] * to_float(kr[d]);
    out[col] = prob(masked_score<T>(p, scaled_score(p, dot, p.scale * kLog2e), b, h, row, col), stats);
  }
}

}  // namespace

int attention_weights(const AttentionParams& p, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  if (blocks <= 0 || blocks > 2147483647) return cudaErrorInvalidConfiguration;
  const int smem = p.head_dim * static_cast<int>(sizeof(float));
  return FA_HALF_DTYPE_SWITCH(p.dtype, T, [&] {
    attention_weights_kernel<T><<<static_cast<unsigned>(blocks), 128, smem, stream>>>(p);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace fa
