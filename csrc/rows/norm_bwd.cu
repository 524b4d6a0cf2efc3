// LayerNorm and RMSNorm backward, from the forward's fp32 mean / rstd. With xhat = (x - mean) * rstd
// (mean = 0 for RMSNorm) and g = dy * w:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (RMSNorm drops the mean(g) term)
//   dw = sum over rows of dy * xhat,  db = sum over rows of dy
// g is rounded once, by __fmul_rn, which nvcc never contracts into an fma: fma(dy, w, -mean(g)) would keep dy * w's
// rounding error where g equals mean(g) (one-element rows, where dx is exactly 0), times rstd = 1/sqrt(eps).
// dw / db are deterministic, without atomics: partial sums over fixed row sets, then added in a fixed order.
// Two paths:
// - Fused (norm_bwd_fused_kernel), for rows of whole 16-byte vectors that fit in registers: every row then
//   splits the same way, so a thread owns the same columns in every row and keeps its share of dw / db in
//   registers across the rows its block walks. x and dy are read once: 3 MN elements moved.
// - Otherwise two passes: dx with one block per row, then a grid of (column tiles x row chunks) re-reads x and
//   dy column-wise for the partial sums (5 MN), since a row's element-to-thread map shifts with its alignment.
// Either way the partial sums are added by column_sums_kernel, in a fixed order.
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "../common/static_switch.h"
#include "row_config.cuh"
#include "rows.h"

namespace fa {
namespace {

constexpr int kColTile = 32;     // columns per partial-sum block (one warp wide, coalesced)
constexpr int kRowLanes = 8;     // rows a partial-sum block walks at once
constexpr int kMaxChunks = 512;  // row chunks, hence rows of partial sums in the workspace
constexpr int kMinChunkRows = 32;
constexpr int kSumChunks = 32;  // column_sums' first pass: chunks of partial rows
// The fused kernel's blocks per SM are capped so that about this many bytes of x and dy rows load at once per
// SM: one block walks its rows one at a time, so short rows need several blocks per SM.
constexpr int64_t kBytesInFlight = 64 * 1024;

template <typename T, typename PT>
struct NormBwdArgs {
  const T* x;
  const T* dy;
  const PT* weight;
  const float* mean;
  const float* rstd;
  T* dx;
  int64_t cols;
};

// The block sums of g and g * xhat over a row, in one reduction; RMSNorm needs only the second (sum(g) = 0 then).
template <bool RMS>
__device__ __forceinline__ float2 row_sums(float sum_g, float sum_gx, float2* scratch) {
  if (RMS) return make_float2(0.f, block_reduce(sum_gx, SumOp(), 0.f, reinterpret_cast<float*>(scratch)));
  return block_reduce(make_float2(sum_g, sum_gx), SumOp(), make_float2(0.f, 0.f), scratch);
}

template <typename T, typename PT, bool RMS, bool CACHED>
__global__ void __launch_bounds__(kMaxThreads) norm_bwd_dx_kernel(const NormBwdArgs<T, PT> a) {
  constexpr const PT* no_bias = nullptr;
  __shared__ float2 scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = a.x + row * a.cols;
  const T* dy = a.dy + row * a.cols;
  const RowSplit s(row * a.cols, a.cols, vec_width<T>());
  const int64_t seg = static_cast<int64_t>(kMaxVecs) * blockDim.x;
  const int64_t segments = CACHED ? 1 : (s.nvec > seg ? (s.nvec + seg - 1) / seg : 1);
  const float mean = RMS ? 0.f : a.mean[row];
  const float rstd = a.rstd[row];
  RowTile<T, kMaxVecs> tx, tg;
  if (CACHED) load_pair(tx, x, tg, dy, s, 0, true);
  // A long row's segment c, into cleared tiles: the last segment's values would otherwise stay live across the
  // loop, beside the new loads in flight (which spilled 32 bytes at bf16).
  auto load_segment = [&](int64_t c) {
    if (!CACHED) {
      tx = {}, tg = {};
      load_pair(tx, x, tg, dy, s, c * seg, c == 0);
    }
  };
  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t c = 0; c < segments; ++c) {
    load_segment(c);
    for_each_affine(tx, tg, s, c * seg, c == 0, a.weight, no_bias, [&](float& xv, float& gv, float w, float) {
      const float g = __fmul_rn(gv, w);
      sum_g += g;
      sum_gx += g * (xv - mean) * rstd;
    });
  }
  const float2 sums = row_sums<RMS>(sum_g, sum_gx, scratch);
  const float mean_g = sums.x / a.cols, mean_gx = sums.y / a.cols;
  for (int64_t c = 0; c < segments; ++c) {
    load_segment(c);
    for_each_affine(tx, tg, s, c * seg, c == 0, a.weight, no_bias, [&](float& xv, float& gv, float w, float) {
      const float g = __fmul_rn(gv, w);
      xv = rstd * (g - mean_g - (xv - mean) * rstd * mean_gx);
    });
    tx.store(a.dx + row * a.cols, s, c * seg, c == 0);
  }
}

// x and dy of one row as this thread's kMaxVecs 16-byte vectors, as loaded (4 registers per 8 bf16 elements,
// half of fp32), so that the fused kernel's fp32 dw / db accumulators fit beside them.
template <typename T>
struct PackedRow {
  static constexpr int V = vec_width<T>();
  uint4 raw[kMaxVecs];

  __device__ __forceinline__ void load(const T* row, int64_t nvec) {
#pragma unroll
    for (int k = 0; k < kMaxVecs; ++k) {
      const int64_t vi = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (vi < nvec) raw[k] = __ldg(reinterpret_cast<const uint4*>(row) + vi);
    }
  }
  __device__ __forceinline__ void unpack(int k, float (&out)[V]) const { unpack_vec<T>(raw[k], out); }
};

// Fused dx and dw / db partial sums, for cols a multiple of V (so every row starts 16-byte aligned and has no
// edge scalars) and at most kMaxVecs vectors per thread. Block b walks rows b, b + G, b + 2G, ... (G blocks),
// then writes its sums to row b of part_w / part_b, (G, cols) fp32.
template <typename T, typename PT, bool RMS, bool HAS_W, bool HAS_B>
__global__ void __launch_bounds__(kMaxThreads)
    norm_bwd_fused_kernel(const NormBwdArgs<T, PT> a, int64_t rows, float* __restrict__ part_w,
                          float* __restrict__ part_b) {
  constexpr int V = vec_width<T>();
  __shared__ float2 scratch[32];
  const int64_t nvec = a.cols / V;
  alignas(16) float dw[kMaxVecs][V], db[kMaxVecs][V];  // stored as float4s at the end
#pragma unroll
  for (int k = 0; k < kMaxVecs; ++k) {
#pragma unroll
    for (int j = 0; j < V; ++j) dw[k][j] = db[k][j] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // the same trips for the whole block
    PackedRow<T> px, pg;
    px.load(a.x + row * a.cols, nvec);
    pg.load(a.dy + row * a.cols, nvec);
    const float mean = RMS ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    // f(k, vi, x, dy, w): this thread's vectors of the row as fp32, with the weight of their columns
    const auto each_vector = [&](auto f) {
#pragma unroll
      for (int k = 0; k < kMaxVecs; ++k) {
        const int64_t vi = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
        if (vi < nvec) {
          float xv[V], gv[V], wv[V];
          px.unpack(k, xv);
          pg.unpack(k, gv);
          load_param(wv, a.weight, vi * V, true, 1.f);
          f(k, vi, xv, gv, wv);
        }
      }
    };
    float sum_g = 0.f, sum_gx = 0.f;
    each_vector([&](int k, int64_t, const float(&xv)[V], const float(&gv)[V], const float(&wv)[V]) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xhat = (xv[j] - mean) * rstd, g = __fmul_rn(gv[j], wv[j]);
        sum_g += g;
        sum_gx += g * xhat;
        if (HAS_W) dw[k][j] += gv[j] * xhat;
        if (HAS_B) db[k][j] += gv[j];
      }
    });
    const float2 sums = row_sums<RMS>(sum_g, sum_gx, scratch);
    const float mean_g = sums.x / a.cols, mean_gx = sums.y / a.cols;
    each_vector([&](int, int64_t vi, const float(&xv)[V], const float(&gv)[V], const float(&wv)[V]) {
      float out[V];
#pragma unroll
      for (int j = 0; j < V; ++j)
        out[j] = rstd * (__fmul_rn(gv[j], wv[j]) - mean_g - (xv[j] - mean) * rstd * mean_gx);
      __stwb(reinterpret_cast<uint4*>(a.dx + row * a.cols) + vi, pack_vec<T>(out));
    });
  }
#pragma unroll
  for (int k = 0; k < kMaxVecs; ++k) {
    const int64_t vi = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (vi < nvec) {
      const int64_t at = blockIdx.x * a.cols + vi * V;
#pragma unroll
      for (int j = 0; j < V; j += 4) {
        if (HAS_W) *reinterpret_cast<float4*>(part_w + at + j) = *reinterpret_cast<const float4*>(&dw[k][j]);
        if (HAS_B) *reinterpret_cast<float4*>(part_b + at + j) = *reinterpret_cast<const float4*>(&db[k][j]);
      }
    }
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

// out[chunk][col] = the sum of in[r][col] over the chunk's rows r (chunk_rows of them): lane y of a
// kColTile x kRowLanes block adds rows y, y + kRowLanes, ... in order, then lane 0 adds the lane sums in order.
// Grid (column tiles, chunks, pairs); chunks = 1 gives the column sums of the whole (rows, cols) matrix. Grid z
// picks the pair: (in0, out0), or (in1, out1), the dbias partials beside dweight's, summed in the same launch.
// OT: float for partial sums, the parameters' dtype for the gradients themselves (rounded once, at the end).
template <typename OT>
__global__ void __launch_bounds__(kColTile * kRowLanes)
    column_sums_kernel(const float* __restrict__ in0, OT* __restrict__ out0, const float* __restrict__ in1,
                       OT* __restrict__ out1, int64_t rows, int64_t cols, int64_t chunk_rows) {
  __shared__ float lanes[kRowLanes][kColTile + 1];
  const float* in = blockIdx.z ? in1 : in0;
  OT* out = blockIdx.z ? out1 : out0;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t r_end = min(rows, (chunk + 1) * chunk_rows);
  float acc = 0.f;
  if (col < cols) {
    for (int64_t r = chunk * chunk_rows + threadIdx.y; r < r_end; r += kRowLanes) acc += in[r * cols + col];
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int i = 1; i < kRowLanes; ++i) acc += lanes[i][threadIdx.x];
    out[chunk * cols + col] = from_float<OT>(acc);
  }
}

int64_t param_chunks(int64_t rows) {
  const int64_t c = ceil_div(rows, kMinChunkRows);
  return c < kMaxChunks ? c : kMaxChunks;
}

// The parameter gradients from their (rows, cols) partial sums, each a null pointer when absent: dweight =
// the column sums of part_w, dbias those of part_b, in a fixed order and two launches for both: the sums over at
// most kSumChunks chunks of rows into `scratch` ((kSumChunks, cols) per gradient), then the sums of those.
template <typename PT>
int sum_columns(const float* part_w, const float* part_b, int64_t rows, int64_t cols, float* scratch, PT* dweight,
                PT* dbias, cudaStream_t stream) {
  const int64_t chunk_rows = ceil_div(rows, kSumChunks);
  const int64_t chunks = ceil_div(rows, chunk_rows);
  const int64_t tiles = ceil_div(cols, kColTile);
  if (tiles > kMaxGrid) return cudaErrorInvalidConfiguration;
  // the present gradients as pairs 0 and (with both) 1
  const float* in0 = part_w ? part_w : part_b;
  PT* out0 = part_w ? dweight : dbias;
  const unsigned pairs = part_w && part_b ? 2 : 1;
  float* chunk0 = scratch;
  float* chunk1 = scratch + kSumChunks * cols;
  const dim3 block(kColTile, kRowLanes);
  column_sums_kernel<float><<<dim3(tiles, chunks, pairs), block, 0, stream>>>(in0, chunk0, part_b, chunk1, rows,
                                                                              cols, chunk_rows);
  column_sums_kernel<PT><<<dim3(tiles, 1, pairs), block, 0, stream>>>(chunk0, out0, chunk1, dbias, chunks, cols,
                                                                      chunks);
  return cudaGetLastError();
}

// Whether the fused kernel takes these rows: whole 16-byte vectors that fit in registers, and some parameter
// gradient to sum (without one, the dx kernel alone already reads x and dy once).
template <typename T>
bool fused(const NormParams& p) {
  return (p.dweight || p.dbias) && p.cols % vec_width<T>() == 0 && cached_threads<T>(p.cols) != 0;
}

template <typename T, typename PT, typename F>
auto fused_switch(const NormParams& p, F f) {
  return FA_BOOL_SWITCH(p.rms, RMS, [&] {
    return FA_BOOL_SWITCH(p.dweight != nullptr, HAS_W, [&] {
      return FA_BOOL_SWITCH(p.dbias != nullptr, HAS_B,
                            [&] { return f(norm_bwd_fused_kernel<T, PT, RMS, HAS_W, HAS_B>); });
    });
  });
}

// The fused kernel's grid, G: the blocks that fit on the GPU at once, capped so that each SM has about
// kBytesInFlight of x and dy rows loading (more blocks add partial rows, not bandwidth), and at `rows`. G
// depends only on the device, the dtype and the shape, so the summation order (and dw's bits) are fixed.
// 0 when the occupancy query fails: the two-pass path is taken then.
template <typename T, typename PT>
int64_t fused_blocks(const NormParams& p) {
  int device = 0;
  if (cudaGetDevice(&device)) {
    cudaGetLastError();  // clear it: the two-pass path checks cudaGetLastError after its launches
    return 0;
  }
  const int threads = cached_threads<T>(p.cols);
  // The device queries cost microseconds a call, twice per backward: their answers are kept per (device,
  // kernel, threads).
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int>, std::pair<int, int>> known;  // -> (SMs, blocks per SM)
  const void* id = fused_switch<T, PT>(p, [](auto kernel) { return reinterpret_cast<const void*>(kernel); });
  std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find({device, id, threads});
  if (found == known.end()) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) ||
        fused_switch<T, PT>(p, [&](auto kernel) {
          return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
        }) || per_sm < 1) {
      cudaGetLastError();
      return 0;
    }
    found = known.emplace(std::make_tuple(device, id, threads), std::make_pair(sms, per_sm)).first;
  }
  const auto [sms, per_sm] = found->second;
  const int64_t row_bytes = 2 * p.cols * static_cast<int64_t>(sizeof(T));
  const int64_t wanted = row_bytes >= kBytesInFlight ? 1 : kBytesInFlight / row_bytes;
  const int64_t blocks = static_cast<int64_t>(sms) * (per_sm < wanted ? per_sm : wanted);
  return blocks < p.rows ? blocks : p.rows;
}

template <typename T, typename PT>
int launch(const NormParams& p, cudaStream_t stream) {
  if (p.rows > kMaxGrid) return cudaErrorInvalidConfiguration;
  const NormBwdArgs<T, PT> a{static_cast<const T*>(p.x), static_cast<const T*>(p.dy),
                             static_cast<const PT*>(p.weight), p.mean, p.rstd, static_cast<T*>(p.out), p.cols};
  PT* dweight = static_cast<PT*>(p.dweight);
  PT* dbias = static_cast<PT*>(p.dbias);
  const int cached = cached_threads<T>(p.cols);
  const int threads = cached ? cached : kMaxThreads;
  if (const int64_t G = fused<T>(p) ? fused_blocks<T, PT>(p) : 0) {
    // workspace: part_w (G, cols), part_b (G, cols), then the chunk sums of each (kSumChunks, cols)
    float* part_w = p.workspace;
    float* part_b = part_w + G * p.cols;
    fused_switch<T, PT>(p, [&](auto kernel) {
      kernel<<<static_cast<unsigned>(G), threads, 0, stream>>>(a, p.rows, part_w, part_b);
      return 0;
    });
    if (int err = cudaGetLastError()) return err;
    return sum_columns(dweight ? part_w : nullptr, dbias ? part_b : nullptr, G, p.cols, part_b + G * p.cols, dweight,
                       dbias, stream);
  }

  FA_BOOL_SWITCH(p.rms, RMS, [&] {
    FA_BOOL_SWITCH(cached != 0, CACHED,
                   [&] { norm_bwd_dx_kernel<T, PT, RMS, CACHED><<<p.rows, threads, 0, stream>>>(a); });
  });
  if (int err = cudaGetLastError()) return err;

  if (p.dweight || p.dbias) {
    const int64_t chunks = param_chunks(p.rows);
    const int64_t chunk_rows = ceil_div(p.rows, chunks);
    const int64_t col_tiles = ceil_div(p.cols, kColTile);
    if (col_tiles > kMaxGrid) return cudaErrorInvalidConfiguration;
    // workspace: part_w (chunks, cols), part_b (chunks, cols), then the chunk sums of each (kSumChunks, cols)
    float* part_w = p.dweight ? p.workspace : nullptr;
    float* part_b = p.dbias ? p.workspace + chunks * p.cols : nullptr;
    float* sums = p.workspace + 2 * chunks * p.cols;
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(chunks));
    norm_param_partial_kernel<T><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
        a.x, a.dy, p.rms ? nullptr : p.mean, p.rstd, part_w, part_b, p.rows, p.cols, chunk_rows);
    if (int err = cudaGetLastError()) return err;
    return sum_columns(part_w, part_b, chunks, p.cols, sums, dweight, dbias, stream);
  }
  return cudaGetLastError();
}

template <typename T, typename PT>
int64_t workspace_floats(const NormParams& p) {
  const int64_t G = fused<T>(p) ? fused_blocks<T, PT>(p) : 0;
  return 2 * ((G ? G : param_chunks(p.rows)) + kSumChunks) * p.cols;
}

}  // namespace

int64_t norm_workspace_floats(const NormParams& p) {
  return FA_FLOAT_DTYPE_SWITCH(p.dtype, T, [&] {
    return FA_PARAM_SWITCH(p.param_dtype, p.dtype, T, PT, [&] { return workspace_floats<T, PT>(p); });
  });
}

int norm_backward(const NormParams& p, cudaStream_t stream) {
  return FA_FLOAT_DTYPE_SWITCH(p.dtype, T, [&] {
    return FA_PARAM_SWITCH(p.param_dtype, p.dtype, T, PT, [&] { return launch<T, PT>(p, stream); });
  });
}

}  // namespace fa
