// Device helpers shared by every kernel: dtype conversion, warp and block reductions, and the split of one row
// into 16-byte vectors plus scalar edges. Included only by .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace fa {

constexpr float kInf = INFINITY;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats as two 16-bit values in one register, `lo` in the low half (the lower column of an mma fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 16 / sizeof(T) floats as one 16-byte vector of T, for a single 16-byte store. Built element by element in a
// T array and reinterpreted, the same vector compiled to four 4-byte stores (st.global.v2.u16) per 16 bytes.
template <typename T>
__device__ __forceinline__ uint4 pack_vec(const float (&v)[16 / sizeof(T)]) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  } else {
    return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  }
}

// The inverse of pack_vec: one 16-byte vector of T as 16 / sizeof(T) floats.
template <typename T>
__device__ __forceinline__ void unpack_vec(uint4 raw, float (&v)[16 / sizeof(T)]) {
  alignas(16) T buf[16 / sizeof(T)];
  *reinterpret_cast<uint4*>(buf) = raw;
#pragma unroll
  for (int j = 0; j < 16 / static_cast<int>(sizeof(T)); ++j) v[j] = to_float(buf[j]);
}

// 2^x from the SFU alone (ex2.approx.ftz: about 2 ulp, as exp2f, but a subnormal result flushes to 0), where
// exp2f adds a range fix-up around it for subnormals. This is what Triton's tl.exp2 and nvcc --use_fast_math
// give. exp2(-inf) = 0 and NaN stays NaN.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// e^x as fast_exp2(x * log2(e)): a multiply and the SFU, against about eight instructions for expf.
__device__ __forceinline__ float fast_exp(float x) { return fast_exp2(x * 1.4426950408889634f); }

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Two values reduced at once, each by its own tree: with block_reduce, one round of shared memory and barriers
// for both (the LayerNorm backward's sums of g and g * xhat).
template <typename Op>
__device__ __forceinline__ float2 warp_reduce(float2 v, Op op) {
  return make_float2(warp_reduce(v.x, op), warp_reduce(v.y, op));
}

// Every thread of the block gets the result. The reduction tree depends only on blockDim, so the result is
// bitwise reproducible. blockDim.x must be a multiple of 32; `scratch` holds 32 values. A one-warp block (the
// norm backward's for rows up to 1K 16-bit columns) needs neither shared memory nor barriers. V is float, or
// float2 for two reductions in one.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V identity, V* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_reduce(v, op);
  if (warps == 1) return v;
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : identity;
  return warp_reduce(v, op);
}

// One row of n elements starting `offset` elements after a 16-byte aligned base, split as: `head` scalars up
// to the first 16-byte boundary, `nvec` whole vectors of V elements, then `tail` scalars. The head and tail
// (fewer than 2V <= 14 elements, so at most one per thread of a >= 32-thread block) are the "edges".
struct RowSplit {
  int64_t nvec;
  int head, tail;

  __device__ RowSplit(int64_t offset, int64_t n, int V) {
    const int misaligned = static_cast<int>(offset % V);
    head = misaligned ? V - misaligned : 0;
    if (head > n) head = static_cast<int>(n);
    nvec = (n - head) / V;
    tail = static_cast<int>(n - head - nvec * V);
  }
  // The column of the edge scalar owned by thread t, or -1.
  __device__ int64_t edge_col(int t, int V) const {
    if (t < head) return t;
    if (t < head + tail) return head + nvec * V + (t - head);
    return -1;
  }
};

// Which threads share a row, and this thread's place among them: the whole block (one row per block), or one
// warp (a row per warp, for short rows). A thread holds vectors first, first + stride, ... of its row's slice.
struct Lanes {
  unsigned first, stride;  // unsigned, as threadIdx: the index arithmetic then needs no sign extension
  __device__ static Lanes block() { return {threadIdx.x, blockDim.x}; }
  __device__ static Lanes warp() { return {threadIdx.x % 32, 32}; }
};

// A slice of one row held in fp32 registers: vectors vec0 + l.first + k * l.stride (k < MAXV) of the
// row's body and, when `edges`, this thread's edge scalar. Slots past the row are never visited by each().
template <typename T, int MAXV>
struct RowTile {
  static constexpr int V = 16 / sizeof(T);
  float v[MAXV][V];
  float e;

  // The loads as issued, before unpack() converts them (the compiler drops these registers after it).
  uint4 raw[MAXV];
  T raw_e;

  // Issues the loads and uses none of them: a conversion beside its load, inside the load's bounds test, would
  // wait there for the data, and the thread would have one 16-byte load in flight at a time instead of MAXV.
  __device__ __forceinline__ void fetch(const T* row, const RowSplit& s, int64_t vec0, bool edges,
                                        Lanes l = Lanes::block()) {
    const uint4* body = reinterpret_cast<const uint4*>(row + s.head);
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int64_t vi = vec0 + l.first + static_cast<int64_t>(k) * l.stride;
      if (vi < s.nvec) raw[k] = __ldg(body + vi);
    }
    if (edges) {
      const int64_t c = s.edge_col(l.first, V);
      if (c >= 0) raw_e = row[c];
    }
  }

  __device__ __forceinline__ void unpack(const RowSplit& s, int64_t vec0, bool edges, Lanes l = Lanes::block()) {
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int64_t vi = vec0 + l.first + static_cast<int64_t>(k) * l.stride;
      if (vi < s.nvec) unpack_vec<T>(raw[k], v[k]);
    }
    if (edges && s.edge_col(l.first, V) >= 0) e = to_float(raw_e);
  }

  __device__ __forceinline__ void load(const T* row, const RowSplit& s, int64_t vec0, bool edges,
                                       Lanes l = Lanes::block()) {
    fetch(row, s, vec0, edges, l);
    unpack(s, vec0, edges, l);
  }

  __device__ __forceinline__ void store(T* row, const RowSplit& s, int64_t vec0, bool edges,
                                        Lanes l = Lanes::block()) const {
    T* body = row + s.head;
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int64_t vi = vec0 + l.first + static_cast<int64_t>(k) * l.stride;
      if (vi < s.nvec) __stwb(reinterpret_cast<uint4*>(body + vi * V), pack_vec<T>(v[k]));
    }
    if (edges) {
      const int64_t c = s.edge_col(l.first, V);
      if (c >= 0) row[c] = from_float<T>(e);
    }
  }
};

// Two tiles of the same slice (y and dy, x and dy): both rows' loads in flight before either is converted.
template <typename T, int MAXV>
__device__ __forceinline__ void load_pair(RowTile<T, MAXV>& a, const T* row_a, RowTile<T, MAXV>& b, const T* row_b,
                                          const RowSplit& s, int64_t vec0, bool edges, Lanes l = Lanes::block()) {
  a.fetch(row_a, s, vec0, edges, l);
  b.fetch(row_b, s, vec0, edges, l);
  a.unpack(s, vec0, edges, l);
  b.unpack(s, vec0, edges, l);
}

// f(value_a&, value_b&, column) over the valid slots of one tile, or of two tiles with the same layout.
template <typename T, int MAXV, typename F>
__device__ __forceinline__ void for_each(RowTile<T, MAXV>& a, RowTile<T, MAXV>& b, const RowSplit& s, int64_t vec0,
                                         bool edges, F f, Lanes l = Lanes::block()) {
  constexpr int V = RowTile<T, MAXV>::V;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int64_t vi = vec0 + l.first + static_cast<int64_t>(k) * l.stride;
    if (vi < s.nvec) {
#pragma unroll
      for (int j = 0; j < V; ++j) f(a.v[k][j], b.v[k][j], s.head + vi * V + j);
    }
  }
  if (edges) {
    const int64_t c = s.edge_col(l.first, V);
    if (c >= 0) f(a.e, b.e, c);
  }
}

template <typename T, int MAXV, typename F>
__device__ __forceinline__ void for_each(RowTile<T, MAXV>& a, const RowSplit& s, int64_t vec0, bool edges, F f,
                                         Lanes l = Lanes::block()) {
  for_each(a, a, s, vec0, edges, [&](float& x, float&, int64_t c) { f(x, c); }, l);
}

// V consecutive values p[col0..col0+V-1] of a per-column parameter (a norm's weight or bias, fp32 or of the
// rows' dtype) as floats, or `fill` each when p is null: 16 bytes a load when `aligned` (p + col0 on a 16-byte
// boundary), else one element at a time.
template <typename PT, int V>
__device__ __forceinline__ void load_param(float (&out)[V], const PT* p, int64_t col0, bool aligned, float fill) {
  constexpr int VP = 16 / sizeof(PT);
  static_assert(V % VP == 0, "a tile vector spans whole 16-byte vectors of the parameters");
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = fill;
  } else if (aligned) {
#pragma unroll
    for (int j = 0; j < V; j += VP) {
      float part[VP];
      unpack_vec<PT>(__ldg(reinterpret_cast<const uint4*>(p + col0 + j)), part);
#pragma unroll
      for (int i = 0; i < VP; ++i) out[j + i] = part[i];
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_float(__ldg(p + col0 + j));
  }
}

// for_each over two tiles with the per-column parameters of each slot: f(value_a&, value_b&, w[col], bias[col]),
// where a null w reads as 1 and a null bias as 0. w and bias are 16-byte aligned (N,) vectors of PT (float or
// T), read 16 bytes at a time wherever the row's split allows (a head of a multiple of 16 / sizeof(PT) columns).
template <typename T, int MAXV, typename PT, typename F>
__device__ __forceinline__ void for_each_affine(RowTile<T, MAXV>& a, RowTile<T, MAXV>& b, const RowSplit& s,
                                                int64_t vec0, bool edges, const PT* w, const PT* bias, F f,
                                                Lanes l = Lanes::block()) {
  constexpr int V = RowTile<T, MAXV>::V;
  const bool aligned = s.head % (16 / sizeof(PT)) == 0;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int64_t vi = vec0 + l.first + static_cast<int64_t>(k) * l.stride;
    if (vi < s.nvec) {
      const int64_t col0 = s.head + vi * V;
      float wv[V], bv[V];
      load_param(wv, w, col0, aligned, 1.f);
      load_param(bv, bias, col0, aligned, 0.f);
#pragma unroll
      for (int j = 0; j < V; ++j) f(a.v[k][j], b.v[k][j], wv[j], bv[j]);
    }
  }
  if (edges) {
    const int64_t c = s.edge_col(l.first, V);
    if (c >= 0) f(a.e, b.e, w ? to_float(w[c]) : 1.f, bias ? to_float(bias[c]) : 0.f);
  }
}

template <typename T, int MAXV, typename PT, typename F>
__device__ __forceinline__ void for_each_affine(RowTile<T, MAXV>& a, const RowSplit& s, int64_t vec0, bool edges,
                                                const PT* w, const PT* bias, F f, Lanes l = Lanes::block()) {
  for_each_affine(a, a, s, vec0, edges, w, bias, [&](float& x, float&, float wc, float bc) { f(x, wc, bc); }, l);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fa
