// The CUDA execution model on the CPU, for the row and attention kernels: enough of it to run their launchers and
// kernels, compiled by the host C++ compiler, on a machine without a GPU. A launch runs each CUDA thread of a block
// as a fiber on the launching thread, walking the blocks in order; __syncthreads and the warp shuffles are
// barriers, where each fiber lets the others run until all have arrived, and __shared__ variables are statics (one
// block at a time uses them). It checks the kernels' logic (indexing,
// reductions, the partition of rows and columns), not their speed, memory model or races: those need the GPU.
// tests/test_cuda_emulated.py rewrites each `kernel<<<grid, block, smem, stream>>>(args)` to
// `emu::launch(kernel, grid, block, smem, stream)(args)`, `extern __shared__` arrays to emu::dynamic_smem, the
// one inline PTX instruction of the row kernels (ex2.approx) to std::exp2 and the attention kernels' block of
// inline PTX to ptx.h, then builds csrc with this header force-included.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {
// The CUDA threads of a block are fibers on the launching thread, switched in turn (round robin) whenever one
// waits at a barrier: no OS scheduler, no atomics, a switch a few instructions long. One OS thread per CUDA thread
// (before 2026-11-28) spent most of the checks' time switching: on 2 cores the emulated attention checks took
// 162-185 s, 60% of the CPU time in the kernel (futex and yield calls); as fibers 51 s on one core, the row checks
// 52-64 s -> 3 s.
// emu_switch_to saves the callee-saved registers, the SSE and x87 control words and the stack pointer of the
// running fiber in *from and resumes the one saved at `to` (x86-64, System V; .weak: every unit includes it).
extern "C" void emu_switch_to(void** from, void* to);
asm(R"(
  .pushsection .text
  .weak emu_switch_to
  .type emu_switch_to, @function
emu_switch_to:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_to, .-emu_switch_to
  .popsection
)");

inline uint3 tid, bid;  // threadIdx, blockIdx of the running fiber
inline int lin;         // its linear index in the block: warp lin / 32, lane lin % 32

struct Fiber {
  void* sp = nullptr;
  std::unique_ptr<char[]> stack;
  uint3 tid{}, bid{};
  int lin = 0;
  bool done = false;
};
inline std::vector<Fiber>* fibers = nullptr;
inline int running = -1;        // the running fiber
inline void* launcher_sp = nullptr;

// Resume the next fiber that has not finished (round robin), or the launcher when none is left; back here when
// this one's turn comes again.
inline void yield() {
  auto& fs = *fibers;
  const int me = running, n = static_cast<int>(fs.size());
  int next = (me + 1) % n;
  while (fs[next].done && next != me) next = (next + 1) % n;
  if (fs[next].done) {  // every fiber has finished (this one too): back to the launcher, never to return
    emu_switch_to(&fs[me].sp, launcher_sp);
    return;
  }
  if (next == me) return;
  running = next;
  emu_switch_to(&fs[me].sp, fs[next].sp);
  running = me;  // resumed
  tid = fs[me].tid, bid = fs[me].bid, lin = fs[me].lin;
}

// A barrier of n fibers: each waiter lets the others run until the last to arrive opens the next phase.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    const unsigned phase = phase_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++phase_;
      return;
    }
    while (phase_ == phase) yield();
  }

 private:
  const int n_;
  int arrived_ = 0;
  unsigned phase_ = 0;
};

struct Warp {
  float buf[32];                           // __shfl_xor_sync's values
  alignas(16) unsigned char posted[1024];  // ptx.h's per-lane operands (32 lanes x up to 32 bytes)
  std::unique_ptr<Barrier> bar;     // the warp's 32 threads
};
inline dim3 bdim, gdim;              // blockDim, gridDim of the running launch
inline Barrier* block_bar = nullptr;
inline std::vector<Warp>* warps = nullptr;
inline int occupancy = 2, sms = 3;             // the made-up GPU of runtime.cpp
inline unsigned char* dynamic_smem = nullptr;  // `extern __shared__` arrays point here
inline void (*fiber_body)() = nullptr;        // the running launch's: every block of the grid, then done

// A fiber's first frame: run the launch's body as fiber `running`, then mark it done and move on.
[[noreturn]] inline void fiber_entry() {
  Fiber& f = (*fibers)[running];
  tid = f.tid, bid = f.bid, lin = f.lin;
  fiber_body();
  f.done = true;
  yield();
  __builtin_unreachable();
}

// A new fiber's stack, laid out as emu_switch_to leaves a suspended one: its first switch "returns" into
// fiber_entry with the stack aligned as after a call.
inline void* initial_stack(char* stack, size_t size) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;                                           // fiber_entry's return address: never used
  *--slot = reinterpret_cast<uint64_t>(&fiber_entry);    // where the first switch returns to
  for (int r = 0; r < 6; ++r) *--slot = 0;               // rbp, rbx, r12-r15
  uint32_t control[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  *--slot = uint64_t{control[0]} | uint64_t{control[1] & 0xffff} << 32;
  return slot;
}

constexpr size_t kFiberStack = 256 * 1024;

template <class K, class... A>
void run_blocks(K kernel, A... args) {
  Fiber& f = (*fibers)[running];
  for (unsigned bz = 0; bz < gdim.z; ++bz)
    for (unsigned by = 0; by < gdim.y; ++by)
      for (unsigned bx = 0; bx < gdim.x; ++bx) {
        bid = f.bid = make_uint3(bx, by, bz);
        kernel(args...);
        block_bar->arrive_and_wait();
      }
}

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
    // One fiber per CUDA thread of a block, walking the blocks in order: the barrier after each block keeps them
    // apart (the block's __shared__ variables are statics).
    // The kernel and its arguments reach the fibers through fiber_body, a plain function (fiber_entry calls it).
    static std::tuple<K, decltype(args)...>* call;
    std::tuple<K, decltype(args)...> this_call(kernel, args...);
    call = &this_call;
    fiber_body = [] { std::apply([](auto k, auto... a) { run_blocks(k, a...); }, *call); };
    std::vector<Fiber> fs(n);
    for (int t = 0; t < n; ++t) {
      fs[t].tid = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      fs[t].lin = t;
      fs[t].stack.reset(new char[kFiberStack]);
      fs[t].sp = initial_stack(fs[t].stack.get(), kFiberStack);
    }
    fibers = &fs;
    running = 0;
    emu_switch_to(&launcher_sp, fs[0].sp);  // back when every fiber has finished
    fibers = nullptr;
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
