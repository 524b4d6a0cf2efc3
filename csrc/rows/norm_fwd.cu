// LayerNorm and RMSNorm forward over the last dim of a contiguous (rows, cols) matrix, one block per row:
//   LayerNorm: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(mean((x - mean)^2) + eps)   (biased variance)
//   RMSNorm:   y = x * rstd * w,              rstd = 1 / sqrt(mean(x^2) + eps)
// The variance is a second pass over (x - mean), not E[x^2] - mean^2, which cancels badly when |mean| >> std.
// A row that fits in registers (CACHED) is read once; a longer one is re-read per pass, chunk by chunk. Short
// rows of whole vectors take a warp each (WARP).
#include "../common/static_switch.h"
#include "row_config.cuh"
#include "rows.h"

namespace fa {
namespace {

template <typename T, typename PT>
struct NormFwdArgs {
  const T* x;
  T* y;
  const PT* weight;
  const PT* bias;
  float* mean;
  float* rstd;
  int64_t cols;
  float eps;
};

// The row's RowGroup holds it: a block, or for short rows of whole vectors (CACHED, WARP) a warp.
template <typename T, typename PT, bool RMS, bool CACHED, bool WARP>
__global__ void __launch_bounds__(kMaxThreads) norm_fwd_kernel(const NormFwdArgs<T, PT> a, int64_t rows) {
  static_assert(CACHED || !WARP, "a warp holds only rows that fit in its registers");
  __shared__ float scratch[32];
  const RowGroup<WARP> group;
  const int64_t row = group.row();
  if (row >= rows) return;  // a warp past the last row: nothing below waits for the block then
  const Lanes l = group.lanes();
  const T* x = a.x + row * a.cols;
  const RowSplit s(row * a.cols, a.cols, vec_width<T>());
  const int64_t seg = static_cast<int64_t>(kMaxVecs) * blockDim.x;
  const int64_t segments = CACHED ? 1 : (s.nvec > seg ? (s.nvec + seg - 1) / seg : 1);
  RowTile<T, kMaxVecs> t;
  if (CACHED) t.load(x, s, 0, true, l);
  // A long row's segment c, into a cleared tile: the last segment's values would otherwise stay live across
  // the loop, beside the new loads in flight.
  auto load_segment = [&](int64_t c) {
    if (!CACHED) {
      t = {};
      t.load(x, s, c * seg, c == 0, l);
    }
  };

  float mean = 0.f;
  if (!RMS) {
    float sum = 0.f;
    for (int64_t c = 0; c < segments; ++c) {
      load_segment(c);
      for_each(t, s, c * seg, c == 0, [&](float& v, int64_t) { sum += v; }, l);
    }
    mean = group.reduce(sum, SumOp(), 0.f, scratch) / a.cols;
  }
  float sq = 0.f;
  for (int64_t c = 0; c < segments; ++c) {
    load_segment(c);
    for_each(t, s, c * seg, c == 0, [&](float& v, int64_t) { sq += (v - mean) * (v - mean); }, l);
  }
  const float rstd = rsqrtf(group.reduce(sq, SumOp(), 0.f, scratch) / a.cols + a.eps);

  for (int64_t c = 0; c < segments; ++c) {
    load_segment(c);
    for_each_affine(t, s, c * seg, c == 0, a.weight, a.bias,
                    [&](float& v, float w, float b) { v = (v - mean) * rstd * w + b; }, l);
    t.store(a.y + row * a.cols, s, c * seg, c == 0, l);
  }
  if (l.first == 0) {
    if (a.mean) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

template <typename T, typename PT>
int launch(const NormParams& p, cudaStream_t stream) {
  if (p.rows > kMaxGrid) return cudaErrorInvalidConfiguration;
  const NormFwdArgs<T, PT> a{static_cast<const T*>(p.x), static_cast<T*>(p.out), static_cast<const PT*>(p.weight),
                             p.rms ? nullptr : static_cast<const PT*>(p.bias), p.rms ? nullptr : p.mean, p.rstd,
                             p.cols, p.eps};
  const bool warp = warp_rows<T>(p.cols);
  const int cached = warp ? 32 * kWarpRows : cached_threads<T>(p.cols);
  const int threads = cached ? cached : kMaxThreads;
  const int64_t blocks = warp ? ceil_div(p.rows, kWarpRows) : p.rows;
  FA_BOOL_SWITCH(p.rms, RMS, [&] {
    if (warp) {
      norm_fwd_kernel<T, PT, RMS, true, true><<<blocks, threads, 0, stream>>>(a, p.rows);
    } else {
      FA_BOOL_SWITCH(cached != 0, CACHED,
                     [&] { norm_fwd_kernel<T, PT, RMS, CACHED, false><<<blocks, threads, 0, stream>>>(a, p.rows); });
    }
  });
  return cudaGetLastError();
}

}  // namespace

int norm_forward(const NormParams& p, cudaStream_t stream) {
  return FA_FLOAT_DTYPE_SWITCH(p.dtype, T, [&] {
    return FA_PARAM_SWITCH(p.param_dtype, p.dtype, T, PT, [&] { return launch<T, PT>(p, stream); });
  });
}

}  // namespace fa
