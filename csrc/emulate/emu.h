// The CUDA execution model on the CPU, for the row kernels (csrc/rows): enough of it to run their launchers and
// kernels, compiled by the host C++ compiler, on a machine without a GPU. A launch runs one OS thread per CUDA
// thread of a block and walks the blocks in order; __syncthreads and the warp shuffles are barriers, and
// __shared__ variables are statics (one block at a time uses them). It checks the kernels' logic (indexing,
// reductions, the partition of rows and columns), not their speed, memory model or races: those need the GPU.
// tests/test_cuda_emulated.py rewrites each `kernel<<<grid, block, smem, stream>>>(args)` to
// `emu::launch(kernel, grid, block, smem, stream)(args)` and the one inline PTX instruction (ex2.approx) to
// std::exp2, then builds csrc/rows with this header force-included.
#pragma once
#include <cuda_runtime.h>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {
struct Warp { float buf[32]; std::unique_ptr<std::barrier<>> bar; };
inline thread_local uint3 tid, bid;
inline thread_local int lin;
inline dim3 bdim, gdim;
inline std::barrier<>* block_bar = nullptr;
inline std::vector<Warp>* warps = nullptr;
inline int occupancy = 2, sms = 3;

template <class K>
auto launch(K kernel, dim3 grid, dim3 block, size_t = 0, cudaStream_t = 0) {
  return [=](auto... args) {
    gdim = grid;
    bdim = block;
    const int n = block.x * block.y * block.z;
    std::barrier<> bar(n);
    std::vector<Warp> ws((n + 31) / 32);
    for (size_t w = 0; w < ws.size(); ++w)
      ws[w].bar = std::make_unique<std::barrier<>>(std::min(32, n - static_cast<int>(w) * 32));
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
}  // namespace emu

#define threadIdx (emu::tid)
#define blockIdx (emu::bid)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
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
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
using std::min;
using std::max;
