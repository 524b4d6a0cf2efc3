// The block of inline PTX in csrc/attention/primitives.cuh, for the CPU emulation (emu.h), which the test puts in
// its place (so this text lands inside namespace fa). ldmatrix and mma.sync are warp-collective: each lane posts its
// operands to its warp's slots, the warp meets at a barrier, and each lane computes its own registers from every
// lane's operands, by the fragment layouts of the PTX ISA (written out in primitives.cuh's header). cp.async
// copies at once, so commit and wait do nothing: a missing wait, like any race, shows only on the GPU.

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ::emu::ldmatrix(r, p, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ::emu::ldmatrix(r, p, true); }

template <typename T>
__device__ __forceinline__ float b16_value(uint32_t bits) {
  const uint16_t raw = static_cast<uint16_t>(bits);
  T v;
  std::memcpy(&v, &raw, 2);
  return to_float(v);
}

// mma.m16n8k16 with fp32 accumulators: A register j of lane (g, c) = (l / 4, l % 4) holds row g + 8 (j % 2),
// columns 2c + 8 (j / 2) + {0, 1}; B register j rows 2c + 8j + {0, 1} of column g; C element e is
// (g + 8 (e / 2), 2c + e % 2).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Operands {
    uint32_t a[4], b[2];
  };
  Operands* ops = ::emu::posted<Operands>();
  const int l = ::emu::lane();
  ops[l] = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
  ::emu::warp_sync();
  float A[16][16], B[16][8];
  for (int q = 0; q < 32; ++q) {
    const int g = q / 4, cc = q % 4;
    for (int j = 0; j < 4; ++j) {
      const int row = g + 8 * (j % 2), col = 2 * cc + 8 * (j / 2);
      A[row][col] = b16_value<T>(ops[q].a[j]);
      A[row][col + 1] = b16_value<T>(ops[q].a[j] >> 16);
    }
    for (int j = 0; j < 2; ++j) {
      B[2 * cc + 8 * j][g] = b16_value<T>(ops[q].b[j]);
      B[2 * cc + 8 * j + 1][g] = b16_value<T>(ops[q].b[j] >> 16);
    }
  }
  ::emu::warp_sync();
  for (int e = 0; e < 4; ++e) {
    const int row = l / 4 + 8 * (e / 2), col = 2 * (l % 4) + e % 2;
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[e] += sum;
  }
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  if (valid)
    std::memcpy(smem, gmem, 16);
  else
    std::memset(smem, 0, 16);
}
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
