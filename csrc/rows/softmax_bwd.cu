// softmax backward: dx = y * (dy - sum(y * dy)) per row, from the forward's output y. Same row split as the
// forward: a warp per short row of whole vectors, one block per row when it fits in registers, else per-chunk
// partial dot products combined in a fixed order (the workspace holds rows * chunks floats, half of what the
// forward's (max, sum) pairs need).
#include "../common/static_switch.h"
#include "row_config.cuh"
#include "rows.h"

namespace fa {
namespace {

// A row held in registers by its RowGroup: a block, or for short rows of whole vectors a warp.
template <typename T, bool WARP>
__global__ void __launch_bounds__(kMaxThreads) softmax_bwd_cached(const T* __restrict__ y, const T* __restrict__ dy,
                                                                  T* __restrict__ dx, int64_t rows, int64_t cols) {
  __shared__ float scratch[32];
  const RowGroup<WARP> group;
  const int64_t row = group.row();
  if (row >= rows) return;  // a warp past the last row: nothing below waits for the block then
  const Lanes l = group.lanes();
  constexpr bool edges = !WARP;  // a warp's rows are whole vectors
  const RowSplit s(row * cols, cols, vec_width<T>());
  RowTile<T, kMaxVecs> ty, tg;
  load_pair(ty, y + row * cols, tg, dy + row * cols, s, 0, edges, l);
  float dot = 0.f;
  for_each(ty, tg, s, 0, edges, [&](float& a, float& g, int64_t) { dot += a * g; }, l);
  dot = group.reduce(dot, SumOp(), 0.f, scratch);
  for_each(ty, tg, s, 0, edges, [&](float& a, float& g, int64_t) { a = a * (g - dot); }, l);
  ty.store(dx + row * cols, s, 0, edges, l);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_bwd_partial(const T* __restrict__ y, const T* __restrict__ dy, float* __restrict__ ws, int64_t cols,
                        int64_t chunks) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const RowSplit s(row * cols, cols, vec_width<T>());
  const int64_t vec0 = chunk * kMaxVecs * blockDim.x;
  const bool edges = chunk == 0;
  RowTile<T, kMaxVecs> ty, tg;
  load_pair(ty, y + row * cols, tg, dy + row * cols, s, vec0, edges);
  float dot = 0.f;
  for_each(ty, tg, s, vec0, edges, [&](float& a, float& g, int64_t) { dot += a * g; });
  dot = block_reduce(dot, SumOp(), 0.f, scratch);
  if (threadIdx.x == 0) ws[row * chunks + chunk] = dot;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    softmax_bwd_finish(const T* __restrict__ y, const T* __restrict__ dy, const float* __restrict__ ws,
                       T* __restrict__ dx, int64_t cols, int64_t chunks) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  float dot = 0.f;
  for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) dot += ws[row * chunks + i];
  dot = block_reduce(dot, SumOp(), 0.f, scratch);

  const RowSplit s(row * cols, cols, vec_width<T>());
  const int64_t vec0 = chunk * kMaxVecs * blockDim.x;
  const bool edges = chunk == 0;
  RowTile<T, kMaxVecs> ty, tg;
  load_pair(ty, y + row * cols, tg, dy + row * cols, s, vec0, edges);
  for_each(ty, tg, s, vec0, edges, [&](float& a, float& g, int64_t) { a = a * (g - dot); });
  ty.store(dx + row * cols, s, vec0, edges);
}

template <typename T>
int launch(const SoftmaxParams& p, cudaStream_t stream) {
  const T* y = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.out);
  const bool warp = warp_rows<T>(p.cols);
  if (const int threads = warp ? 32 * kWarpRows : cached_threads<T>(p.cols)) {
    const int64_t blocks = warp ? ceil_div(p.rows, kWarpRows) : p.rows;
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    FA_BOOL_SWITCH(warp, WARP,
                   [&] { softmax_bwd_cached<T, WARP><<<blocks, threads, 0, stream>>>(y, dy, dx, p.rows, p.cols); });
    return cudaGetLastError();
  }
  const int64_t chunks = row_chunks<T>(p.cols);
  if (p.rows * chunks > kMaxGrid) return cudaErrorInvalidConfiguration;
  softmax_bwd_partial<T><<<p.rows * chunks, kChunkThreads, 0, stream>>>(y, dy, p.workspace, p.cols, chunks);
  softmax_bwd_finish<T><<<p.rows * chunks, kChunkThreads, 0, stream>>>(y, dy, p.workspace, dx, p.cols, chunks);
  return cudaGetLastError();
}

}  // namespace

int softmax_backward(const SoftmaxParams& p, cudaStream_t stream) {
  return FA_FLOAT_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, stream); });
}

}  // namespace fa
