// load_tile (primitives.cuh) under the CPU emulation, for every tile shape the attention kernels load (each head
// dim of kHeadDims, each row count of AttnTraits, both dtypes): rows below `len` copied, rows at or past it zeros,
// and nothing written outside the tile's ROWS x D elements: not the 8 padding columns of each row, not the rows
// after the tile (the next tile in the kernels' shared memory). The whole-kernel tests cannot see a write past a
// tile: there the next tile's copy lands after it and overwrites it. Built and run by tests/test_cuda_emulated.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdio>
#include <cstring>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "attention/kernel_traits.h"
#include "attention/primitives.cuh"
#include "emu.h"

static int failures = 0, checks = 0;
constexpr uint16_t kUntouched = 0xffff;  // emu::launch's fill of dynamic shared memory
constexpr int kGuardRows = 8;            // rows after the tile that must stay untouched

template <class T, int D, int ROWS>
void check(int len_past_row0) {
  using Tr = fa::AttnTraits<D>;
  constexpr int P = Tr::kPitch;
  static_assert(sizeof(T) == 2);
  // Rows row0 .. row0 + ROWS - 1 of a matrix whose row pitch is wider than D (as a (B, L, H, D) tensor's is);
  // every element distinct and none equal to the fill.
  const int row0 = ROWS, len = row0 + len_past_row0, rows = row0 + ROWS;
  const int64_t stride = D + 24;
  std::vector<uint16_t> src(rows * stride);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint16_t>(i % 0x7fff + 1);

  std::vector<uint16_t> smem((ROWS + kGuardRows) * P);
  const size_t bytes = smem.size() * sizeof(uint16_t);
  emu::launch([&] {
    T* tile = reinterpret_cast<T*>(emu::dynamic_smem);
    fa::load_tile<T, D, ROWS, Tr::kThreads>(tile, reinterpret_cast<const T*>(src.data()), stride, row0, len);
    fa::cp_async_commit();
    fa::cp_async_wait<0>();
    __syncthreads();
    if (threadIdx.x == 0) std::memcpy(smem.data(), tile, bytes);
  }, 1, Tr::kThreads, bytes)();

  int wrong = 0, stray = 0;
  for (int r = 0; r < ROWS + kGuardRows; ++r)
    for (int c = 0; c < P; ++c) {
      const uint16_t got = smem[r * P + c];
      if (r >= ROWS || c >= D)
        stray += got != kUntouched;
      else
        wrong += got != (row0 + r < len ? src[(row0 + r) * stride + c] : 0);
    }
  ++checks;
  if (wrong || stray) {
    ++failures;
    std::printf("FAIL %s D%d ROWS%d len row0+%d: %d elements wrong, %d written outside the tile\n",
                std::is_same_v<T, __half> ? "fp16" : "bf16", D, ROWS, len_past_row0, wrong, stray);
  }
}

template <class T, int D>
void check_head_dim() {
  using Tr = fa::AttnTraits<D>;
  for (int part : {0, 1, 5}) {  // no row valid, one, five (a partial tile)
    check<T, D, Tr::kFwdM>(part);
    check<T, D, Tr::kFwdN>(part);
    check<T, D, Tr::kBwdN>(part);
    check<T, D, Tr::kBwdM>(part);
    check<T, D, Tr::kDqM>(part);
    check<T, D, Tr::kDqN>(part);
  }
  check<T, D, Tr::kFwdM>(Tr::kFwdM);  // every row valid
  check<T, D, Tr::kBwdM>(Tr::kBwdM);
  check<T, D, Tr::kDqN>(Tr::kDqN);
}

int main() {
  [&]<size_t... I>(std::index_sequence<I...>) {
    (check_head_dim<__half, fa::kHeadDims[I]>(), ...);
    (check_head_dim<__nv_bfloat16, fa::kHeadDims[I]>(), ...);
  }(std::make_index_sequence<std::size(fa::kHeadDims)>{});
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
