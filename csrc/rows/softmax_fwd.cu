// softmax forward over the last dim of a contiguous (rows, cols) matrix: y = exp(x - max) / sum(exp(x - max)).
// Rows that fit one block's registers are read once (softmax_fwd_cached; short ones a warp each, softmax_fwd_warp). Longer rows are split across blocks
// in two passes: each chunk's (max, sum of exp) is combined online in a fixed order, so the result does not
// depend on scheduling. A row of only -inf gives NaN, as torch.
#include "../common/static_switch.h"
#include "row_config.cuh"
#include "rows.h"

namespace fa {
namespace {

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) softmax_fwd_cached(const T* __restrict__ x, T* __restrict__ y, int64_t cols) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const RowSplit s(row * cols, cols, vec_width<T>());
  RowTile<T, kMaxVecs> t;
  t.load(x + row * cols, s, 0, true);
  float m = -kInf;
  for_each(t, s, 0, true, [&](float& v, int64_t) { m = fmaxf(m, v); });
  m = block_reduce(m, MaxOp(), -kInf, scratch);
  float sum = 0.f;
  for_each(t, s, 0, true, [&](float& v, int64_t) {
    v = fast_exp(v - m);
    sum += v;
  });
  const float inv = 1.f / block_reduce(sum, SumOp(), 0.f, scratch);
  for_each(t, s, 0, true, [&](float& v, int64_t) { v *= inv; });
  t.store(y + row * cols, s, 0, true);
}

// Rows of whole vectors that fit one warp's registers: a warp per row, kWarpRows rows per block.
template <typename T>
__global__ void __launch_bounds__(32 * kWarpRows)
    softmax_fwd_warp(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t cols) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRows + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp: nothing below waits for the block
  const Lanes l = Lanes::warp();
  const RowSplit s(row * cols, cols, vec_width<T>());  // whole vectors: no edge scalars
  RowTile<T, kMaxVecs> t;
  t.load(x + row * cols, s, 0, false, l);
  float m = -kInf;
  for_each(t, s, 0, false, [&](float& v, int64_t) { m = fmaxf(m, v); }, l);
  m = warp_reduce(m, MaxOp());
  float sum = 0.f;
  for_each(t, s, 0, false, [&](float& v, int64_t) {
    v = fast_exp(v - m);
    sum += v;
  }, l);
  const float inv = 1.f / warp_reduce(sum, SumOp());
  for_each(t, s, 0, false, [&](float& v, int64_t) { v *= inv; }, l);
  t.store(y + row * cols, s, 0, false, l);
}

// Pass 1: block (row, chunk) writes its chunk's max and sum(exp(x - max)) to ws[row][chunk].
template <typename T>
__global__ void __launch_bounds__(kMaxThreads) softmax_fwd_partial(const T* __restrict__ x, float2* __restrict__ ws, int64_t cols, int64_t chunks) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const RowSplit s(row * cols, cols, vec_width<T>());
  const int64_t vec0 = chunk * kMaxVecs * blockDim.x;
  const bool edges = chunk == 0;
  RowTile<T, kMaxVecs> t;
  t.load(x + row * cols, s, vec0, edges);
  float m = -kInf;
  for_each(t, s, vec0, edges, [&](float& v, int64_t) { m = fmaxf(m, v); });
  m = block_reduce(m, MaxOp(), -kInf, scratch);
  const float shift = m == -kInf ? 0.f : m;  // a chunk of only -inf contributes 0, not NaN
  float sum = 0.f;
  for_each(t, s, vec0, edges, [&](float& v, int64_t) { sum += fast_exp(v - shift); });
  sum = block_reduce(sum, SumOp(), 0.f, scratch);
  if (threadIdx.x == 0) ws[row * chunks + chunk] = make_float2(m, sum);
}

// Pass 2: every block of a row combines the row's partials in the same order, then writes its chunk.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads) softmax_fwd_finish(const T* __restrict__ x, const float2* __restrict__ ws, T* __restrict__ y,
                                   int64_t cols, int64_t chunks) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const float2* part = ws + row * chunks;
  float m = -kInf;
  for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) m = fmaxf(m, part[i].x);
  m = block_reduce(m, MaxOp(), -kInf, scratch);
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) sum += part[i].y * fast_exp(part[i].x - m);
  const float inv = 1.f / block_reduce(sum, SumOp(), 0.f, scratch);

  const RowSplit s(row * cols, cols, vec_width<T>());
  const int64_t vec0 = chunk * kMaxVecs * blockDim.x;
  const bool edges = chunk == 0;
  RowTile<T, kMaxVecs> t;
  t.load(x + row * cols, s, vec0, edges);
  for_each(t, s, vec0, edges, [&](float& v, int64_t) { v = fast_exp(v - m) * inv; });
  t.store(y + row * cols, s, vec0, edges);
}

template <typename T>
int launch(const SoftmaxParams& p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.out);
  if (warp_rows<T>(p.cols)) {
    const int64_t blocks = ceil_div(p.rows, kWarpRows);
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    softmax_fwd_warp<T><<<blocks, 32 * kWarpRows, 0, stream>>>(x, y, p.rows, p.cols);
    return cudaGetLastError();
  }
  if (const int threads = cached_threads<T>(p.cols)) {
    if (p.rows > kMaxGrid) return cudaErrorInvalidConfiguration;
    softmax_fwd_cached<T><<<p.rows, threads, 0, stream>>>(x, y, p.cols);
    return cudaGetLastError();
  }
  const int64_t chunks = row_chunks<T>(p.cols);
  if (p.rows * chunks > kMaxGrid) return cudaErrorInvalidConfiguration;
  float2* ws = reinterpret_cast<float2*>(p.workspace);
  softmax_fwd_partial<T><<<p.rows * chunks, kChunkThreads, 0, stream>>>(x, ws, p.cols, chunks);
  softmax_fwd_finish<T><<<p.rows * chunks, kChunkThreads, 0, stream>>>(x, ws, y, p.cols, chunks);
  return cudaGetLastError();
}

}  // namespace

int64_t softmax_workspace_floats(const SoftmaxParams& p) {
  return FA_FLOAT_DTYPE_SWITCH(p.dtype, T, [&]() -> int64_t {
    return cached_threads<T>(p.cols) ? 0 : 2 * p.rows * row_chunks<T>(p.cols);
  });
}

int softmax_forward(const SoftmaxParams& p, cudaStream_t stream) {
  return FA_FLOAT_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, stream); });
}

}  // namespace fa
