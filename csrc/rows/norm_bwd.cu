// LayerNorm and RMSNorm backward, from the forward's fp32 mean / rstd. With xhat = (x - mean) * rstd
// (mean = 0 for RMSNorm) and g = dy * w:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (RMSNorm drops the mean(g) term)
//   dw = sum over rows of dy * xhat,  db = sum over rows of dy
// dx: one block per row (as the forward). dw / db are deterministic, without atomics: a grid of
// (column tiles x row chunks) writes per-chunk partial sums, then one thread per column adds its chunks in
// order. The partial pass re-reads x and dy (column-wise, coalesced) rather than folding into the dx kernel,
// whose per-row element-to-thread map shifts with each row's alignment.
#include "../common/static_switch.h"
#include "row_config.cuh"
#include "rows.h"

namespace fa {
namespace {

constexpr int kColTile = 32;     // columns per partial-sum block (one warp wide, coalesced)
constexpr int kRowLanes = 8;     // rows a partial-sum block walks at once
constexpr int kMaxChunks = 512;  // row chunks, hence rows of partial sums in the workspace
constexpr int kMinChunkRows = 32;

template <typename T>
struct NormBwdArgs {
  const T* x;
  const T* dy;
  const float* weight;
  const float* mean;
  const float* rstd;
  T* dx;
  int64_t cols;
};

template <typename T, bool RMS, bool CACHED>
__global__ void __launch_bounds__(kMaxThreads) norm_bwd_dx_kernel(const NormBwdArgs<T> a) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = a.x + row * a.cols;
  const T* dy = a.dy + row * a.cols;
  const RowSplit s(row * a.cols, a.cols, vec_width<T>());
  const int64_t seg = static_cast<int64_t>(kMaxVecs) * blockDim.x;
  const int64_t segments = CACHED ? 1 : (s.nvec > seg ? (s.nvec + seg - 1) / seg : 1);
  const float mean = RMS ? 0.f : a.mean[row];
  const float rstd = a.rstd[row];
  RowTile<T, kMaxVecs> tx, tg;
  if (CACHED) {
    tx.load(x, s, 0, true);
    tg.load(dy, s, 0, true);
  }
  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t c = 0; c < segments; ++c) {
    if (!CACHED) {
      tx.load(x, s, c * seg, c == 0);
      tg.load(dy, s, c * seg, c == 0);
    }
    for_each_affine(tx, tg, s, c * seg, c == 0, a.weight, nullptr, [&](float& xv, float& gv, float w, float) {
      const float g = gv * w;
      sum_g += g;
      sum_gx += g * (xv - mean) * rstd;
    });
  }
  const float mean_g = RMS ? 0.f : block_reduce(sum_g, SumOp(), 0.f, scratch) / a.cols;
  const float mean_gx = block_reduce(sum_gx, SumOp(), 0.f, scratch) / a.cols;
  for (int64_t c = 0; c < segments; ++c) {
    if (!CACHED) {
      tx.load(x, s, c * seg, c == 0);
      tg.load(dy, s, c * seg, c == 0);
    }
    for_each_affine(tx, tg, s, c * seg, c == 0, a.weight, nullptr, [&](float& xv, float& gv, float w, float) {
      const float g = gv * w;
      xv = rstd * (g - mean_g - (xv - mean) * rstd * mean_gx);
    });
    tx.store(a.dx + row * a.cols, s, c * seg, c == 0);
  }
}

// Block (column tile, chunk) of kColTile x kRowLanes threads: partial[chunk][col] over the chunk's rows.
template <typename T>
__global__ void __launch_bounds__(kColTile * kRowLanes)
    norm_param_partial_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ mean,
                              const float* __restrict__ rstd, float* __restrict__ part_w, float* __restrict__ part_b,
                              int64_t rows, int64_t cols, int64_t chunk_rows) {
  __shared__ float sw[kRowLanes][kColTile + 1];
  __shared__ float sb[kRowLanes][kColTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t r_end = min(rows, (chunk + 1) * chunk_rows);
  float acc_w = 0.f, acc_b = 0.f;
  if (col < cols) {
    for (int64_t r = chunk * chunk_rows + threadIdx.y; r < r_end; r += kRowLanes) {
      const float g = to_float(dy[r * cols + col]);
      const float xhat = (to_float(x[r * cols + col]) - (mean ? mean[r] : 0.f)) * rstd[r];
      acc_w += g * xhat;
      acc_b += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = acc_w;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int i = 1; i < kRowLanes; ++i) {
      acc_w += sw[i][threadIdx.x];
      acc_b += sb[i][threadIdx.x];
    }
    if (part_w) part_w[chunk * cols + col] = acc_w;
    if (part_b) part_b[chunk * cols + col] = acc_b;
  }
}

__global__ void norm_param_finish_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t cols,
                                         int64_t chunks) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float acc = 0.f;
  for (int64_t c = 0; c < chunks; ++c) acc += part[c * cols + col];
  out[col] = acc;
}

int64_t param_chunks(int64_t rows) {
  const int64_t c = ceil_div(rows, kMinChunkRows);
  return c < kMaxChunks ? c : kMaxChunks;
}

template <typename T>
int launch(const NormParams& p, cudaStream_t stream) {
  if (p.rows > kMaxGrid) return cudaErrorInvalidConfiguration;
  const NormBwdArgs<T> a{static_cast<const T*>(p.x), static_cast<const T*>(p.dy), p.weight, p.mean, p.rstd,
                         static_cast<T*>(p.out), p.cols};
  const int cached = cached_threads<T>(p.cols);
  const int threads = cached ? cached : kMaxThreads;
  FA_BOOL_SWITCH(p.rms, RMS, [&] {
    FA_BOOL_SWITCH(cached != 0, CACHED,
                   [&] { norm_bwd_dx_kernel<T, RMS, CACHED><<<p.rows, threads, 0, stream>>>(a); });
  });
  if (int err = cudaGetLastError()) return err;

  if (p.dweight || p.dbias) {
    const int64_t chunks = param_chunks(p.rows);
    const int64_t chunk_rows = ceil_div(p.rows, chunks);
    const int64_t col_tiles = ceil_div(p.cols, kColTile);
    if (col_tiles > kMaxGrid) return cudaErrorInvalidConfiguration;
    float* part_w = p.dweight ? p.workspace : nullptr;
    float* part_b = p.dbias ? p.workspace + chunks * p.cols : nullptr;
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(chunks));
    norm_param_partial_kernel<T><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
        a.x, a.dy, p.rms ? nullptr : p.mean, p.rstd, part_w, part_b, p.rows, p.cols, chunk_rows);
    const int64_t blocks = ceil_div(p.cols, 256);
    if (part_w) norm_param_finish_kernel<<<blocks, 256, 0, stream>>>(part_w, p.dweight, p.cols, chunks);
    if (part_b) norm_param_finish_kernel<<<blocks, 256, 0, stream>>>(part_b, p.dbias, p.cols, chunks);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t norm_workspace_floats(const NormParams& p) { return 2 * param_chunks(p.rows) * p.cols; }

int norm_backward(const NormParams& p, cudaStream_t stream) {
  return FA_FLOAT_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p, stream); });
}

}  // namespace fa
