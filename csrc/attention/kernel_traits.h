// Tile shapes of the attention kernels, per head dim. Every kernel runs 4 warps; each warp owns 16 rows of the
// tile it iterates from (queries in the forward and dQ kernels, keys in the dK/dV kernel).
#pragma once

namespace fa {

template <int D>
struct AttnTraits {
  static_assert(D % 16 == 0, "head dim must be a multiple of the mma k-step (16)");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // Shared-memory row pitch in elements: 16 bytes of padding shift consecutive rows by 4 banks, so the 8 row
  // addresses of each ldmatrix phase fall in distinct banks.
  static constexpr int kPitch = D + 8;

  // forward: 64 queries per block, 64 keys per step
  static constexpr int kFwdM = 64, kFwdN = 64;
  // dK/dV: 64 keys per block; queries per step shrink with D so that dK, dV (2 x D/2 fp32 per thread) plus
  // the S and dP tiles stay in registers
  static constexpr int kBwdN = 64, kBwdM = D <= 64 ? 64 : 32;
  // dQ: 64 queries per block; keys per step shrink with D for the same reason
  static constexpr int kDqM = 64, kDqN = D <= 64 ? 64 : 32;

  template <typename T>
  static constexpr int fwd_smem() { return (kFwdM + 2 * kFwdN) * kPitch * static_cast<int>(sizeof(T)); }
  template <typename T>
  static constexpr int dkdv_smem() {
    return (2 * kBwdN + 2 * kBwdM) * kPitch * static_cast<int>(sizeof(T)) + 2 * kBwdM * 4;
  }
  template <typename T>
  static constexpr int dq_smem() { return (2 * kDqM + 2 * kDqN) * kPitch * static_cast<int>(sizeof(T)); }
};

}  // namespace fa
