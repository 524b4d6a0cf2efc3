// LayerNorm and RMSNorm forward over the last dim of a contiguous (rows, cols) matrix, one block per row:
//   LayerNorm: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(mean((x - mean)^2) + eps)   (biased variance)
//   RMSNorm:   y = x * rstd * w,              rstd = 1 / sqrt(mean(x^2) + eps)
// The variance is a second pass over (x - mean), not E[x^2] - mean^2, which cancels badly when |mean| >> std.
// A row that fits in registers (CACHED) is read once; a longer one is re-read per pass, chunk by chunk. Short
// rows of whole vectors take a warp each (norm_fwd_warp).
#include "../common/static_switch.h"
#include "row_config.cuh"
#include "rows.h"

namespace fa {
namespace {

template <typename T>
struct NormFwdArgs {
  const T* x;
  T* y;
  const float* weight;
  const float* bias;
  float* mean;
  float* rstd;
  int64_t cols;
  float eps;
};

template <typename T, bool RMS, bool CACHED>
__global__ void __launch_bounds__(kMaxThreads) norm_fwd_kernel(const NormFwdArgs<T> a) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = a.x + row * a.cols;
  const RowSplit s(row * a.cols, a.cols, vec_width<T>());
  const int64_t seg = static_cast<int64_t>(kMaxVecs) * blockDim.x;
  const int64_t segments = CACHED ? 1 : (s.nvec > seg ? (s.nvec + seg - 1) / seg : 1);
  RowTile<T, kMaxVecs> t;
  if (CACHED) t.load(x, s, 0, true);

  float mean = 0.f;
  if (!RMS) {
    float sum = 0.f;
    for (int64_t c = 0; c < segments; ++c) {
      if (!CACHED) t.load(x, s, c * seg, c == 0);
      for_each(t, s, c * seg, c == 0, [&](float& v, int64_t) { sum += v; });
    }
    mean = block_reduce(sum, SumOp(), 0.f, scratch) / a.cols;
  }
  float sq = 0.f;
  for (int64_t c = 0; c < segments; ++c) {
    if (!CACHED) t.load(x, s, c * seg, c == 0);
    for_each(t, s, c * seg, c == 0, [&](float& v, int64_t) { sq += (v - mean) * (v - mean); });
  }
  const float rstd = rsqrtf(block_reduce(sq, SumOp(), 0.f, scratch) / a.cols + a.eps);

  for (int64_t c = 0; c < segments; ++c) {
    if (!CACHED) t.load(x, s, c * seg, c == 0);
    for_each_affine(t, s, c * seg, c == 0, a.weight, a.bias,
                    [&](float& v, float w, float b) { v = (v - mean) * rstd * w + b; });
    t.store(a.y + row * a.cols, s, c * seg, c == 0);
  }
  if (threadIdx.x == 0) {
    if (a.mean) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// Rows of whole vectors that fit one warp's registers: a warp per row, kWarpRows rows per block.
template <typename T, bool RMS>
__global__ void __launch_bounds__(32 * kWarpRows) norm_fwd_warp(const NormFwdArgs<T> a, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRows + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp: nothing below waits for the block
  const Lanes l = Lanes::warp();
  const RowSplit s(row * a.cols, a.cols, vec_width<T>());  // whole vectors: no edge scalars
  RowTile<T, kMaxVecs> t;
  t.load(a.x + row * a.cols, s, 0, false, l);
  float mean = 0.f;
  if (!RMS) {
    float sum = 0.f;
    for_each(t, s, 0, false, [&](float& v, int64_t) { sum += v; }, l);
    mean = warp_reduce(sum, SumOp()) / a.cols;
  }
  float sq = 0.f;
  for_each(t, s, 0, false, [&](float& v, int64_t) { sq += (v - mean) * (v - mean); }, l);
  const float rstd = rsqrtf(warp_reduce(sq, SumOp()) / a.cols + a.eps);
  for_each_affine(t, s, 0, false, a.weight, a.bias,
                  [&](float& v, float w, float b) { v = (v - mean) * rstd * w + b; }, l);
  t.store(a.y + row * a.cols, s, 0, false, l);
  if (l.first == 0) {
    if (a.mean) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

template <typename T>
int launch(const NormParams& p, cudaStream_t stream) {
  if (p.rows > kMaxGrid) return cudaErrorInvalidConfiguration;
  const NormFwdArgs<T> a{static_cast<const T*>(p.x), static_cast<T*>(p.out), p.weight, p.rms ? nullptr : p.bias,
                         p.rms ? nullptr : p.mean, p.rstd, p.cols, p.eps};
  if (warp_rows<T>(p.cols)) {
    const int64_t blocks = ceil_div(p.rows, kWarpRows);
    FA_BOOL_SWITCH(p.rms, RMS, [&] { norm_fwd_warp<T, RMS><<<blocks, 32 * kWarpRows, 0, stream>>>(a, p.rows); });
    return cudaGetLastError();
  }
  const int cached = cached_threads<T>(p.cols);
  const int threads = cached ? cached : kMaxThreads;
  FA_BOOL_SWITCH(p.rms, RMS, [&] {
    FA_BOOL_SWITCH(cached != 0, CACHED, [&] { norm_fwd_kernel<T, RMS, CACHED><<<p.rows, threads, 0, stream>>>(a); });
  });
  return cudaGetLastError();
}

}  // namespace

int norm_forward(const NormParams& p, cudaStream_t stream) {
  return FA_FLOAT_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, stream); });
}

}  // namespace fa
