// The CUDA execution model on the CPU, for the row and attention kernels: enough of it to run their launchers and
// kernels, compiled by the host C++ compiler, on a machine without a GPU. A launch runs one OS thread per CUDA
// thread of a block and walks the blocks in order; __syncthreads and the warp shuffles are barriers, and
// __shared__ variables are statics (one block at a time uses them). It checks the kernels' logic (indexing,
// reductions, the partition of rows and columns), not their speed, memory model or races: those need the GPU.
// tests/test_cuda_emulated.py rewrites each `kernel<<<grid, block, smem, stream>>>(args)` to
// `emu::launch(kernel, grid, block, smem, stream)(args)`, `extern __shared__` arrays to emu::dynamic_smem, the
// one inline PTX instruction of the row kernels (ex2.approx) to std::exp2 and the attention kernels' block of
// inline PTX to ptx.h, then builds csrc with this header force-included.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {
// A barrier of n threads. A block's 128 threads wait at each __syncthreads and a warp's 32 at each shuffle, on a
// machine of a few cores: a waiter yields its core a few dozen times before it sleeps, so that the threads still
// to arrive run. std::barrier put every waiter to sleep at once: on 2 cores the emulated attention checks took
// 205 s with it, 167 s with this, the row checks 69 s and 52 s.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    const unsigned phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {  // the last: open the next phase
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      phase_.notify_all();
      return;
    }
    for (int i = 0; phase_.load(std::memory_order_acquire) == phase; ++i) {
      if (i < 64) std::this_thread::yield();
      else phase_.wait(phase, std::memory_order_acquire);
    }
  }

 private:
  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> phase_{0};
};

struct Warp {
  float buf[32];                           // __shfl_xor_sync's values
  alignas(16) unsigned char posted[1024];  // ptx.h's per-lane operands (32 lanes x up to 32 bytes)
  std::unique_ptr<Barrier> bar;     // the warp's 32 threads
};
inline thread_local uint3 tid, bid;  // threadIdx, blockIdx of the calling thread
inline thread_local int lin;         // its linear index in the block: warp lin / 32, lane lin % 32
inline dim3 bdim, gdim;              // blockDim, gridDim of the running launch
inline Barrier* block_bar = nullptr;
inline std::vector<Warp>* warps = nullptr;
inline int occupancy = 2, sms = 3;             // the made-up GPU of runtime.cpp
inline unsigned char* dynamic_smem = nullptr;  // `extern __shared__` arrays point here

template <class K>
auto launch(K kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = 0) {
  return [=](auto... args) {
    gdim = grid;
    bdim = block;
    // Dynamic shared memory starts as all-ones bytes (NaN in 16-bit floats), not zeros: reading what no copy
    // wrote shows up.
    std::vector<unsigned char> dynamic(smem + 16, 0xff);
    dynamic_smem = dynamic.data() + (16 - reinterpret_cast<uintptr_t>(dynamic.data()) % 16) % 16;
    const int n = block.x * block.y * block.z;
    Barrier bar(n);
    std::vector<Warp> ws((n + 31) / 32);
    for (size_t w = 0; w < ws.size(); ++w)
      ws[w].bar = std::make_unique<Barrier>(std::min(32, n - static_cast<int>(w) * 32));
    block_bar = &bar;
    warps = &ws;
    // One OS thread per CUDA thread of a block, walking the blocks in order: a barrier after each block keeps
    // them apart (the block's __shared__ variables are statics).
    std::vector<std::thread> ts;
    for (int t = 0; t < n; ++t)
      ts.emplace_back([&, t] {
        tid = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        lin = t;
        for (unsigned bz = 0; bz < grid.z; ++bz)
          for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
              bid = make_uint3(bx, by, bz);
              kernel(args...);
              bar.arrive_and_wait();
            }
      });
    for (auto& th : ts) th.join();
  };
}

// For ptx.h: a warp's per-lane slots, and its barrier.
template <typename V>
V* posted() {
  static_assert(32 * sizeof(V) <= sizeof(Warp::posted), "operands too big to post");
  return reinterpret_cast<V*>((*warps)[lin / 32].posted);
}
inline int lane() { return lin % 32; }
inline void warp_sync() { (*warps)[lin / 32].bar->arrive_and_wait(); }

// Element `col` of a row of 16-bit values, as raw bits in the low half.
inline uint32_t b16(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * col, 2);
  return v;
}

// ldmatrix.x4: lanes 8i..8i+7 give the rows of 8x8 matrix i; register i of lane l gets its elements
// (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1), or those of its transpose with .trans.
inline void ldmatrix(uint32_t (&r)[4], const void* p, bool trans) {
  const void** rows = posted<const void*>();
  const int l = lane();
  rows[l] = p;
  warp_sync();
  for (int i = 0; i < 4; ++i) {
    if (trans)
      r[i] = b16(rows[8 * i + 2 * (l % 4)], l / 4) | b16(rows[8 * i + 2 * (l % 4) + 1], l / 4) << 16;
    else
      r[i] = b16(rows[8 * i + l / 4], 2 * (l % 4)) | b16(rows[8 * i + l / 4], 2 * (l % 4) + 1) << 16;
  }
  warp_sync();
}
}  // namespace emu

#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  auto& w = (*emu::warps)[emu::lin / 32];
  const int lane = emu::lin % 32;
  w.buf[lane] = v;
  w.bar->arrive_and_wait();
  const float r = w.buf[lane ^ offset];
  w.bar->arrive_and_wait();
  return r;
}
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// cuda_runtime.h declares the kernel-pointer overload for nvcc only.
template <class... A>
cudaError_t cudaFuncSetAttribute(void (*)(A...), cudaFuncAttribute, int) { return cudaSuccess; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
using std::min;
using std::max;
