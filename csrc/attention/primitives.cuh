// Warp-level building blocks of the attention kernels, as inline PTX for sm_80+: ldmatrix (shared memory to
// mma fragments), mma.sync m16n8k16 with fp32 accumulators, and cp.async 16-byte copies global -> shared.
//
// Fragment layout of mma.m16n8k16 (g = lane / 4, c = lane % 4), which the kernels rely on:
//   A (16x16, row-major):  a0 = (g, 2c..2c+1)  a1 = (g+8, 2c..)  a2 = (g, 2c+8..)  a3 = (g+8, 2c+8..)
//   B (16x8, k x n):       b0 = (k 2c..2c+1, n g)  b1 = (k 2c+8.., n g)
//   C (16x8, fp32):        c0, c1 = (g, 2c), (g, 2c+1)   c2, c3 = (g+8, 2c), (g+8, 2c+1)
// So the C fragments of two adjacent n-tiles, packed to 16 bits, are exactly an A fragment: the probabilities
// P computed by one mma feed the next (P V) without leaving registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/device.cuh"
#include "flash.h"

namespace fa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kFloatMax = 3.402823466e38f;  // FLT_MAX

// --- inline PTX, sm_80+. csrc/emulate/ptx.h stands in for this block on the CPU (tests/test_cuda_emulated.py).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared, asynchronously; `valid` false zero-fills the destination and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// --- end of inline PTX

// The identity on a C fragment's values (mma_cs_m's default transform).
struct AsIs {
  __device__ __forceinline__ float operator()(int, int, float v) const { return v; }
};

// The A fragment of columns 16kk..16kk+15 from C fragments (n-tiles 2kk and 2kk+1) of a 16-row tile, each value
// passed through f(n-tile, slot, value) on its way.
template <typename T, typename F>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4], int kk, F f) {
  a[0] = pack2<T>(f(2 * kk, 0, lo[0]), f(2 * kk, 1, lo[1]));
  a[1] = pack2<T>(f(2 * kk, 2, lo[2]), f(2 * kk, 3, lo[3]));
  a[2] = pack2<T>(f(2 * kk + 1, 0, hi[0]), f(2 * kk + 1, 1, hi[1]));
  a[3] = pack2<T>(f(2 * kk + 1, 2, hi[2]), f(2 * kk + 1, 3, hi[3]));
}

// A ROWS x D tile into shared memory with pitch D + 8: rows row0.. of a matrix, row r at base + offset(r) (a
// functor of the row index, called for rows below `len` only); rows at or past `len` become zeros, copied from
// `base` (any valid address).
template <typename T, int D, int ROWS, int THREADS, typename Offset>
__device__ __forceinline__ void load_rows(T* smem, const T* base, Offset offset, int row0, int len) {
  constexpr int kChunks = D / 8;  // 16-byte pieces per row
  constexpr int kPieces = ROWS * kChunks, kIters = (kPieces + THREADS - 1) / THREADS;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = threadIdx.x + it * THREADS;
    // Head dims 16 and 80 leave the last round part of the threads (D 80: 32 rows x 10 pieces on 128 threads).
    if (kPieces % THREADS != 0 && i >= kPieces) break;
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool valid = row0 + r < len;
    cp_async_16(smem + r * (D + 8) + c, valid ? base + offset(row0 + r) + c : base, valid);
  }
}

// Rows row0.. of a (L, D) matrix starting at `base` with row pitch `row_stride` (load_rows).
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t row_stride, int row0, int len) {
  load_rows<T, D, ROWS, THREADS>(smem, base, [=](int r) { return r * row_stride; }, row0, len);
}

// Keys row0.. of sequence b's K or V: with PAGED through a paged KV cache's block table (flash.h,
// AttentionParams::block_table), key j being row j % page_size of page table[b][j / page_size], pages page_stride
// apart from `base`; without, load_tile's rows of base. `params` is the kernel's own, unchanged: its fields are read
// from the constant bank, not held in registers.
template <typename T, int D, int ROWS, int THREADS, bool PAGED>
__device__ __forceinline__ void load_keys(T* smem, const AttentionParams& params, int b, const T* base,
                                          int64_t row_stride, int64_t page_stride, int row0, int len) {
  if constexpr (PAGED) {
    const int* table = params.block_table + b * params.block_table_stride;
    const auto offset = [=, &params](int j) {
      return table[j / params.page_size] * page_stride + (j % params.page_size) * row_stride;
    };
    load_rows<T, D, ROWS, THREADS>(smem, base, offset, row0, len);
  } else {
    load_tile<T, D, ROWS, THREADS>(smem, base, row_stride, row0, len);
  }
}

// ldmatrix addresses (row, column offsets within a 16x16 block) for each lane:
//   A operand from a row-major [row][k] tile:                     row lane%16,                col (lane/16)*8
//   B operand from an [n][k] tile (k contiguous), two n-tiles:    row lane%8 + (lane/16)*8,   col ((lane/8)%2)*8
//   B operand from a [k][n] tile (n contiguous), .trans, two n-tiles: row lane%8 + ((lane/8)%2)*8, col (lane/16)*8
__device__ __forceinline__ int a_row(int lane) { return lane % 16; }
__device__ __forceinline__ int a_col(int lane) { return (lane / 16) * 8; }
__device__ __forceinline__ int bn_row(int lane) { return lane % 8 + (lane / 16) * 8; }
__device__ __forceinline__ int bn_col(int lane) { return ((lane / 8) % 2) * 8; }
__device__ __forceinline__ int bt_row(int lane) { return lane % 8 + ((lane / 8) % 2) * 8; }
__device__ __forceinline__ int bt_col(int lane) { return (lane / 16) * 8; }

// Warp-tile GEMMs over shared-memory tiles of pitch P (elements). A warp owns MT 16-row tiles of A (rows
// 16 mt .. 16 mt + 15) and their fp32 accumulators acc[mt] (N / 8 C fragments of a 16 x N tile each), in the mma
// layout above. Each B fragment read from shared memory with ldmatrix serves all MT tiles, so a warp of two tiles
// reads B half as often per mma as a warp of one. The forward runs two tiles per warp, the backward one.

// The A fragments of the 16 x K row-major tile at sA (row 0 of the warp's rows), for operands reused across tiles.
template <int K, int P, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[K / 16][4], const T* sA, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) ldmatrix_x4(a[kk], sA + a_row(lane) * P + kk * 16 + a_col(lane));
}

// acc[mt] += a[mt] B^T for one k-step: a[mt] one 16x16 A fragment per tile, B the N x 16 slice of an [n][k] tile
// (k contiguous) starting at sB.
template <typename T, int N, int P, int MT>
__device__ __forceinline__ void mma_a_bt_m(float (&acc)[MT][N / 8][4], const uint32_t (&a)[MT][4], const T* sB,
                                           int lane) {
#pragma unroll
  for (int np = 0; np < N / 16; ++np) {
    uint32_t b[4];
    ldmatrix_x4(b, sB + (np * 16 + bn_row(lane)) * P + bn_col(lane));
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
      mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
    }
  }
}

// acc[mt] += A_mt B^T: A_mt the warp's mt-th 16 x K tile as load_a fragments, B an N x K [n][k] tile at sB.
template <typename T, int K, int N, int P, int MT>
__device__ __forceinline__ void mma_rs_bt_m(float (&acc)[MT][N / 8][4], const uint32_t (&a)[MT][K / 16][4],
                                            const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a_kk[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) a_kk[mt][r] = a[mt][kk][r];
    }
    mma_a_bt_m<T, N, P, MT>(acc, a_kk, sB + kk * 16, lane);
  }
}

// acc[mt] += A_mt B^T: A the warp's (16 MT) x K row-major tile at sA, read a 16 x 16 fragment per tile and k-step.
template <typename T, int K, int N, int P, int MT>
__device__ __forceinline__ void mma_ss_bt_m(float (&acc)[MT][N / 8][4], const T* sA, const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], sA + (mt * 16 + a_row(lane)) * P + kk * 16 + a_col(lane));
    mma_a_bt_m<T, N, P, MT>(acc, a, sB + kk * 16, lane);
  }
}

// acc[mt] += C_mt B: C_mt the warp's mt-th 16 x K fp32 tile (K / 8 C fragments, e.g. probabilities), rounded to T
// as the A operand without leaving registers; B a K x N [k][n] tile (n contiguous) at sB, read with
// ldmatrix.trans. With f, the operand is f(n-tile, slot, value) of each value instead (the backward's dropout).
template <typename T, int K, int N, int P, int MT, typename F = AsIs>
__device__ __forceinline__ void mma_cs_m(float (&acc)[MT][N / 8][4], const float (&c)[MT][K / 8][4], const T* sB,
                                         int lane, F f = {}) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) c_to_a<T>(a[mt], c[mt][2 * kk], c[mt][2 * kk + 1], kk, f);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (kk * 16 + bt_row(lane)) * P + np * 16 + bt_col(lane));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// One-tile forms, for the backward's 16-row warps: acc is one tile's N / 8 C fragments.
template <typename T, int K, int N, int P>
__device__ __forceinline__ void mma_ss_bt(float (&acc)[N / 8][4], const T* sA, const T* sB, int lane) {
  mma_ss_bt_m<T, K, N, P, 1>(reinterpret_cast<float (&)[1][N / 8][4]>(acc), sA, sB, lane);
}

template <typename T, int K, int N, int P, typename F = AsIs>
__device__ __forceinline__ void mma_cs(float (&acc)[N / 8][4], const float (&c)[K / 8][4], const T* sB, int lane,
                                       F f = {}) {
  mma_cs_m<T, K, N, P, 1>(reinterpret_cast<float (&)[1][N / 8][4]>(acc),
                          reinterpret_cast<const float (&)[1][K / 8][4]>(c), sB, lane, f);
}

// Where element e of C fragment nt sits in its warp tile: row frag_row (0..15), column frag_col (0..N-1).
__device__ __forceinline__ int frag_row(int lane, int e) { return lane / 4 + (e / 2) * 8; }
__device__ __forceinline__ int frag_col(int lane, int nt, int e) { return nt * 8 + (lane % 4) * 2 + (e & 1); }

// x * log2(e) for a finite x: log2(e) * finfo.min overflows fp32 to -inf, so the result is raised to -FLT_MAX
// then. A comparison, not fmaxf, so that NaN stays NaN (as in torch).
__device__ __forceinline__ float finite_log2e(float x) {
  const float scaled = x * kLog2e;
  return scaled < -kFloatMax ? -kFloatMax : scaled;
}

// Whether (query row, key col) lies outside the local window (AttentionParams::window). WINDOW false, here and in
// the helpers below: the kernel takes no window (dropout's), and the window's code is left out.
template <bool WINDOW = true>
__device__ __forceinline__ bool outside_window(const AttentionParams& p, int row, int col) {
  return WINDOW && p.window && (col - row < -p.window_left || col - row > p.window_right);
}

// The score of (query row, key col) in log2 units (x is already the scaled, maybe capped, q.k in log2 units), or
// -inf where masked: past either length, above the causal diagonal, outside the window, a False in a bool mask. An
// additive mask adds its value. KIND: the mask kind, or kAny to read it from p.
template <typename T, MaskKind KIND = MaskKind::kAny, bool WINDOW = true>
__device__ __forceinline__ float masked_score(const AttentionParams& p, float x, int b, int h, int row, int col) {
  if (row >= p.q_len || col >= p.k_len || (p.causal && col > row) || outside_window<WINDOW>(p, row, col))
    return -kInf;
  const MaskKind kind = KIND == MaskKind::kAny ? p.mask_kind : KIND;
  if (kind == MaskKind::kNone) return x;
  const int64_t at = b * p.mask_batch_stride + h * p.mask_head_stride + row * p.mask_q_stride +
                     col * p.mask_k_stride;
  if (kind == MaskKind::kBool) return static_cast<const uint8_t*>(p.mask)[at] ? x : -kInf;
  // A finite mask value stays finite, or a row padded with finfo.min (Hugging Face's mask; a uniform average in
  // torch) would be a dead row of zeros; a real -inf stays -inf.
  const float add = to_float(static_cast<const T*>(p.mask)[at]);
  return x + (add == -kInf ? add : finite_log2e(add));
}

// Whether masked_score is the identity on a whole warp tile: query rows q0..q0+rows-1 against keys
// k0..k0+cols-1, all in range, none above the causal diagonal or outside the window, no mask tensor. Such interior
// tiles (all but the edges and the diagonals of a long sequence) skip the per-score bounds, causal, window and mask
// tests.
template <bool WINDOW = true>
__device__ __forceinline__ bool unmasked_tile(const AttentionParams& p, int q0, int rows, int k0, int cols) {
  return p.mask_kind == MaskKind::kNone && q0 + rows <= p.q_len && k0 + cols <= p.k_len &&
         (!p.causal || k0 + cols - 1 <= q0) &&
         (!WINDOW || !p.window || (k0 - (q0 + rows - 1) >= -p.window_left && k0 + cols - 1 - q0 <= p.window_right));
}

// [lo, hi): the keys that query rows r0..r1-1 may see under causal and the window, lo rounded down to a multiple
// of `align` (the key tiles start there). Empty (lo >= hi) when they see none.
struct Span {
  int lo, hi;
};

template <bool WINDOW = true>
__device__ __forceinline__ Span visible_keys(const AttentionParams& p, int r0, int r1, int align) {
  int64_t lo = 0, hi = p.k_len;  // 64-bit: a side of kNoWindow goes past 2^31
  if (p.causal && r1 < hi) hi = r1;
  if (WINDOW && p.window) {
    lo = max(lo, int64_t{r0} - p.window_left);
    hi = min(hi, int64_t{r1} + p.window_right);
  }
  return {static_cast<int>(lo / align * align), static_cast<int>(hi)};
}

// [lo, hi): the query rows that may see keys c0..c1-1 (visible_keys turned around), lo a multiple of `align`.
template <bool WINDOW = true>
__device__ __forceinline__ Span visible_rows(const AttentionParams& p, int c0, int c1, int align) {
  int64_t lo = 0, hi = p.q_len;
  if (p.causal) lo = c0;
  if (WINDOW && p.window) {
    lo = max(lo, int64_t{c0} - p.window_right);
    hi = min(hi, int64_t{c1} + p.window_left);
  }
  return {static_cast<int>(lo / align * align), static_cast<int>(hi)};
}

// base moved on by `elements` of T; nullptr stays nullptr.
template <typename T>
__device__ __forceinline__ const void* advanced(const void* base, int64_t elements) {
  return base == nullptr ? base : static_cast<const T*>(base) + elements;
}
template <typename T>
__device__ __forceinline__ void* advanced(void* base, int64_t elements) {
  return base == nullptr ? base : static_cast<T*>(base) + elements;
}

// The params a block of packed sequence b works with (AttentionParams::cu_seq_q): the pointers at the sequence's
// first rows (a paged KV cache's pool left at its start), its own lengths, and its bottom-right window
// turned into the kernels' top-left one (query i of Lq sees keys i + (Lk - Lq) - left .. i + (Lk - Lq) + right).
// Dense calls get p itself, and so do kernels compiled without PACKED (dropout's: packed sequences take no
// dropout), which then carry none of this code.
template <typename T, bool PACKED = true>
__device__ __forceinline__ AttentionParams for_sequence(const AttentionParams& p, int b) {
  if (!PACKED || p.cu_seq_q == nullptr) return p;
  AttentionParams s = p;
  const int q0 = p.cu_seq_q[b], k0 = p.block_table != nullptr ? 0 : p.cu_seq_k[b];  // pages: load_keys places keys
  s.q_len = p.cu_seq_q[b + 1] - q0;
  s.k_len = p.seqused_k != nullptr ? p.seqused_k[b] : p.cu_seq_k[b + 1] - k0;
  s.q = advanced<T>(p.q, q0 * p.q_row_stride);
  s.out = advanced<T>(p.out, q0 * p.o_row_stride);
  s.dout = advanced<T>(p.dout, q0 * p.do_row_stride);
  s.dq = advanced<T>(p.dq, q0 * p.dq_row_stride);
  s.k = advanced<T>(p.k, k0 * p.k_row_stride);
  s.v = advanced<T>(p.v, k0 * p.v_row_stride);
  s.dk = advanced<T>(p.dk, k0 * p.dkv_row_stride);
  s.dv = advanced<T>(p.dv, k0 * p.dkv_row_stride);
  s.row_max = p.row_max + q0, s.row_log_sum = p.row_log_sum + q0;
  if (p.delta != nullptr) s.delta = p.delta + q0;
  if (p.window) {  // 64-bit, clamped: a side far past the lengths bounds nothing (or hides every key)
    const int64_t shift = int64_t{s.k_len} - s.q_len, far = kNoWindow;
    if (p.window_left != kNoWindow) s.window_left = static_cast<int>(max(-far, min(far, p.window_left - shift)));
    if (p.window_right != kNoWindow) s.window_right = static_cast<int>(max(-far, min(far, p.window_right + shift)));
  }
  return s;
}

// Where head h of batch b starts in row_max, row_log_sum and delta: (B, H, Lq), or (H, total_q) for packed
// sequences (whose pointers for_sequence has moved to the sequence's first row).
__device__ __forceinline__ int64_t stats_offset(const AttentionParams& p, int b, int h) {
  return p.cu_seq_q != nullptr ? int64_t{h} * p.total_q : (int64_t{b} * p.heads + h) * p.q_len;
}

// The score in log2 units of a dot product q.k: scale * log2(e) * q.k, or under the logit cap c (p.softcap)
// c * log2(e) * tanh(scale * q.k / c); slope(1 - tanh^2) then receives the cap's derivative (the backward's).
struct NoSlope {
  __device__ void operator()(float) const {}
};
struct NoSlopes {  // scale_and_mask's, per fragment slot
  __device__ void operator()(int, int, float) const {}
};

template <typename Slope = NoSlope>
__device__ __forceinline__ float scaled_score(const AttentionParams& p, float dot, float scale2, Slope slope = {}) {
  if (p.softcap == 0.f) return dot * scale2;
  const float t = tanhf(dot * (p.scale / p.softcap));
  slope(1.f - t * t);
  return p.softcap * kLog2e * t;
}

// s = scaled_score(s), then masked_score on each score of a warp's fragment tile unless the tile is `interior`
// (unmasked_tile), where it would change nothing. at(nt, e) gives fragment slot (nt, e)'s {query row, key col,
// query head}: the head is the same for the whole tile but in decoding, whose rows pack a GQA group's heads. Under
// the logit cap, slopes(nt, e, 1 - tanh^2) receives each score's slope. CAP false: the caller never caps (a kernel
// instantiated without the cap), and the cap's code is left out; WINDOW false likewise for the window.
// BY_KIND: one loop over the scores per mask kind instead of the kind tested per score. In the dQ kernel's 16 x 64
// tiles (head dims up to 64) the per-score test had ptxas keep both kinds' loads and addresses for all 32 scores
// in flight: 255 registers and 212 bytes of spill stores at head dim 64 (96 at 32), 168 and 16 (149 and none) by
// kind (sm_90). Elsewhere the three loops cost more than they save (the forward at head dim 128: 80 -> 96 bytes).
template <typename T, bool BY_KIND = false, bool CAP = true, bool WINDOW = true, int NTILES, typename At,
          typename Slopes = NoSlopes>
__device__ __forceinline__ void scale_and_mask(float (&s)[NTILES][4], const AttentionParams& p, float scale2,
                                               bool interior, int b, At at, Slopes slopes = {}) {
  if (CAP && p.softcap != 0.f) {  // a branch the whole block takes together
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[nt][e] = scaled_score(p, s[nt][e], scale2, [&](float slope) { slopes(nt, e, slope); });
    }
    scale2 = 1.f;  // the masks below see the capped scores
  }
  if (interior) {
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= scale2;
    }
    return;
  }
  const auto each = [&](auto kind) {  // kind: MaskKind::kAny (read from p), or one kind as a constant
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int3 at_e = at(nt, e);
        s[nt][e] = masked_score<T, decltype(kind)::value, WINDOW>(p, s[nt][e] * scale2, b, at_e.z, at_e.x, at_e.y);
      }
    }
  };
  using Kind = MaskKind;
  if (!BY_KIND) each(std::integral_constant<Kind, Kind::kAny>{});
  else if (p.mask_kind == Kind::kBool) each(std::integral_constant<Kind, Kind::kBool>{});
  else if (p.mask_kind == Kind::kAdditive) each(std::integral_constant<Kind, Kind::kAdditive>{});
  else each(std::integral_constant<Kind, Kind::kNone>{});
}

// A query row's saved statistics (AttentionParams::row_max, row_log_sum) as the backward and the weights use them:
// the max, +inf for a row with every key masked (so P = 0 there, not exp2(-inf + inf) = NaN; a NaN max, from a
// NaN in the row's mask, stays NaN and so does P, as in torch), and the log sum. Rows past q_len: P = 0.
struct RowStats {
  float max, log_sum;
};

__device__ __forceinline__ RowStats row_stats(const AttentionParams& p, int64_t row, bool valid = true) {
  if (!valid) return {kInf, 0.f};
  return {p.row_max[row] == -kInf ? kInf : p.row_max[row], p.row_log_sum[row]};
}

// A probability recomputed from a row's statistics, P = exp2((score - max) - log sum), at most 1 (the difference
// may round just above 0). The two are subtracted one after the other: a row masked with finfo.min everywhere has
// scores and max of -FLT_MAX, where only this order gives torch's 1 / Lk (score - (max + log sum) gives 0). One
// more subtraction per score than the sum would cost; splitting the backward's loops by mask kind to spare it
// instead moved ptxas's register choices (sm_90: 16 bytes of spill in dK/dV at head dim 32, the dropout dQ kernel
// at head dim 128 from 168 to 237 registers), where this form spills nothing.
__device__ __forceinline__ float prob(float score, const RowStats& r) {
  const float d = (score - r.max) - r.log_sum;
  return fast_exp2(d > 0.f ? 0.f : d);  // at most 1; NaN stays NaN (fminf would drop it)
}

constexpr float kRescaleSlack = 8.f;  // log2 units: P <= 2^8 between rescales

// One key tile of the online softmax (FlashAttention-2's loop) over a warp's MT 16-row tiles: s holds the tile's
// scores in log2 units (-inf where masked) as C fragments and leaves holding P = exp2(s - row max); row_max,
// this lane's share of the row sums (row_sum; the 4 lanes of a quad share a row) and the fp32 output tiles acc
// (rescaled when the max moves) carry over from tile to tile. A row whose keys are all masked so far keeps
// max = -inf, sum = 0 and P = 0.
template <int MT, int N, int D>
__device__ __forceinline__ void online_softmax(float (&s)[MT][N / 8][4], float (&row_max)[MT][2],
                                               float (&row_sum)[MT][2], float (&acc)[MT][D / 8][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -kInf;
#pragma unroll
      for (int nt = 0; nt < N / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * i], s[mt][nt][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a quad share a row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // The row keeps the max it last rescaled to until a tile's max passes it by more than kRescaleSlack
      // (FlashAttention-4's lazy rescaling). Within the slack P stays at most 2^8, which the fp32 sums and the
      // 16-bit P of the P V mma hold at full relative precision, and O / sum at the end is the same quotient.
      // Past the first key tiles the max rarely moves that far, so most steps skip the D / 4 multiplies of O
      // per row (a branch the whole warp skips together). -inf + slack is -inf: the first finite tile rescales.
      if (mx > row_max[mt][i] + kRescaleSlack) {
        const float rescale = fast_exp2(row_max[mt][i] - mx);  // 0 from -inf: O and the sum are 0 then anyway
        row_max[mt][i] = mx;
        row_sum[mt][i] *= rescale;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          acc[mt][dt][2 * i] *= rescale;
          acc[mt][dt][2 * i + 1] *= rescale;
        }
      }
      // all masked so far: exp2(-inf - 0) = 0, not NaN
      const float shift = row_max[mt][i] == -kInf ? 0.f : row_max[mt][i];
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < N / 8; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          s[mt][nt][2 * i + j] = fast_exp2(s[mt][nt][2 * i + j] - shift);
          sum += s[mt][nt][2 * i + j];
        }
      }
      row_sum[mt][i] += sum;  // this lane's share; quad_sum adds the quad's at the end
    }
  }
}

// Dropout, decided exactly as the Triton kernels decide it (kernels/attention.py), so that both backends drop the
// same probabilities for the same seed: (b, h, i, j) is kept iff tl.rand(seed, ((b * H + h) * Lq + i) * Lk + j)
// >= dropout_p. That is Philox4x32-10 of the counter (offset's low word, its high word, 0, 0) under the key
// (seed's low word, its high word); the first output word, as an int32 folded onto [0, 2^31) (~x where negative),
// times the largest float under 2^-31. Counter-based: the backward regenerates the forward's decisions.
__device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = __umulhi(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = __umulhi(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const int32_t x = static_cast<int32_t>(c0);
  return static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
}

// Whether dropout keeps the probability of (batch b, query head h, query row, key col).
__device__ __forceinline__ bool dropout_keep(const AttentionParams& p, int b, int h, int row, int col) {
  const uint64_t offset = ((static_cast<uint64_t>(b) * p.heads + h) * p.q_len + row) * p.k_len + col;
  return philox_uniform(p.seed, offset) >= p.dropout_p;
}

// Dropout on a warp's fragment tile of probabilities: the kept ones times dropout_scale, the others 0. at(nt, e)
// gives slot (nt, e)'s {query row, key col, query head}, as for scale_and_mask.
template <int NTILES, typename At>
__device__ __forceinline__ void dropout(float (&s)[NTILES][4], const AttentionParams& p, int b, At at) {
#pragma unroll
  for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int3 at_e = at(nt, e);
      s[nt][e] = dropout_keep(p, b, at_e.z, at_e.x, at_e.y) ? s[nt][e] * p.dropout_scale : 0.f;
    }
  }
}

// A row's sum from the shares of the 4 lanes of its quad.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Two adjacent elements of one output row, as one 4-byte store.
template <typename T>
__device__ __forceinline__ void store2(T* dst, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(dst) = pack2<T>(lo, hi);
}

}  // namespace fa
