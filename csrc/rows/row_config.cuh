// Block shapes of the row kernels, shared by their launchers.
#pragma once

#include "../common/device.cuh"

namespace fa {

// Each thread keeps up to kMaxVecs 16-byte vectors of a row in registers, so one block of up to 512 threads
// holds a row of 8K float32 or 16K float16/bfloat16 elements, read once and written once. 512, not 1024:
// backward holds two such tiles (64 floats per thread), which needs more than the 64 registers a thread may
// use in a 1024-thread block. Longer rows are cut
// into chunks of kMaxVecs * kChunkThreads vectors (softmax: one block per chunk; the norms: one block per
// row that loops over its chunks).
constexpr int kMaxVecs = 4;
constexpr int kMaxThreads = 512;
constexpr int kChunkThreads = 512;
static_assert(kChunkThreads <= kMaxThreads, "every row kernel is compiled for at most kMaxThreads threads");

template <typename T>
__host__ __device__ constexpr int vec_width() { return 16 / sizeof(T); }

// Vectors a row may hold, whatever its alignment (the head can only shorten the body).
template <typename T>
inline int64_t max_row_vecs(int64_t cols) { return ceil_div(cols, vec_width<T>()); }

// Threads for a row that fits in registers, or 0 when it does not fit.
template <typename T>
inline int cached_threads(int64_t cols) {
  const int64_t vecs = max_row_vecs<T>(cols);
  if (vecs > static_cast<int64_t>(kMaxVecs) * kMaxThreads) return 0;
  const int64_t threads = ceil_div(ceil_div(vecs, kMaxVecs), 32) * 32;
  return static_cast<int>(threads < 32 ? 32 : threads);
}

template <typename T>
inline int64_t row_chunks(int64_t cols) {
  const int64_t c = ceil_div(max_row_vecs<T>(cols), static_cast<int64_t>(kMaxVecs) * kChunkThreads);
  return c < 1 ? 1 : c;
}

// Short rows of whole 16-byte vectors (at most kMaxVecs per lane of a warp: 1K 16-bit or 512 fp32 columns) take
// a warp each, kWarpRows rows per block, in the forward kernels: warp shuffles instead of block reductions and
// their barriers, and a quarter of the blocks of one row per one-warp block.
constexpr int kWarpRows = 4;

template <typename T>
inline bool warp_rows(int64_t cols) {
  return cols % vec_width<T>() == 0 && cols / vec_width<T>() <= 32 * kMaxVecs;
}

// The threads that share a row in a kernel that holds it in registers: the whole block (a row per block,
// reductions through shared memory), or for warp_rows one warp (kWarpRows rows per block, shuffles alone).
template <bool WARP>
struct RowGroup {
  __device__ int64_t row() const {
    return WARP ? static_cast<int64_t>(blockIdx.x) * kWarpRows + threadIdx.x / 32 : blockIdx.x;
  }
  __device__ Lanes lanes() const { return WARP ? Lanes::warp() : Lanes::block(); }
  template <typename Op>
  __device__ float reduce(float v, Op op, float identity, float* scratch) const {
    if constexpr (WARP) return warp_reduce(v, op);
    else return block_reduce(v, op, identity, scratch);
  }
};

constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

}  // namespace fa
