// softmax forward over the last dim of a contiguous (rows, cols) matrix: y = exp(x - max) / sum(exp(x - max)).
// Rows that fit in registers are read once (softmax_fwd_cached: a block per row, or a warp per short row). Longer
// rows are split across blocks in two passes: each chunk's (max, sum of exp) is combined online in a fixed order,
// so the result does not depend on scheduling. A row of only -inf gives NaN, as torch.
#include "../common/static_switch.h"
#include "row_config.cuh"
#include "rows.h"

namespace fa {
namespace {

// A row held in registers by its RowGroup: a block, or for short rows of whole vectors a warp.
template <typename T, bool WARP>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_fwd_cached(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t cols) {
  __shared__ float scratch[32];
  const RowGroup<WARP> group;
  const int64_t row = group.row();
  if (row >= rows) return;  // a warp past the last row: nothing below waits for the block then
  const Lanes l = group.lanes();
  constexpr bool edges = !WARP;  // a warp's rows are whole vectors
  const RowSplit s(row * cols, cols, vec_width<T>());
  RowTile<T, kMaxVecs> t;
  t.load(x + row * cols, s, 0, edges, l);
  float m = -kInf;
  for_each(t, s, 0, edges, [&](float& v, int64_t) { m = fmaxf(m, v); }, l);
  m = group.reduce(m, MaxOp(), -kInf, scratch);
  float sum = 0.f;
  for_each(t, s, 0, edges, [&](float& v, int64_t) {
    v = fast_exp(v - m);
    sum += v;
  }, l);
  const float inv = 1.f / group.reduce(sum, SumOp(), 0.f, scratch);
  for_each(t, s, 0, edges, [&](float& v, int64_t) { v *= inv; }, l);
  t.store(y + row * cols, s, 0, edges, l);
}

// Pass 1: block (row, chunk) writes its chunk's max and sum(exp(x - max)) to ws[row][chunk].
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_fwd_partial(const T* __restrict__ x, float2* __restrict__ ws, int64_t cols, int64_t chunks) {
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
__global__ void __launch_bounds__(kMaxThreads)
    softmax_fwd_finish(const T* __restrict__ x, const float2* __restrict__ ws, T* __restrict__ y, int64_t cols,
                       int64_t chunks) {
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
  const bool warp = warp_rows<T>(p.cols);
  if (const int threads = warp ? 32 * kWarpRows : cached_threads<T>(p.cols)) {
    const int64_t blocks = warp ? ceil_div(p.rows, kWarpRows) : p.rows;
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    FA_BOOL_SWITCH(warp, WARP,
                   [&] { softmax_fwd_cached<T, WARP><<<blocks, threads, 0, stream>>>(x, y, p.rows, p.cols); });
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
