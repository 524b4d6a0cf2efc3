// Tile shapes of the attention kernels, per head dim. Every kernel runs 4 warps; each warp owns 16 rows of the
// tile it iterates from (queries in the forward and dQ kernels, keys in the dK/dV kernel), or in the forward two
// such 16-row tiles.
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

  // forward: each warp owns kFwdMTiles 16-row tiles of queries (kFwdM = 128 per block) and steps kFwdN = 64 keys
  // at a time: FlashAttention-2's 128 x 64 block of 4 warps, which torch's flash backend runs at every head dim
  // up to 128. Two tiles per warp halve the K / V fragments read from shared memory per mma against one. The
  // fp32 output tile (MT x D / 2 per thread) and the scores (MT x kFwdN / 2) stay in registers; Q's fragments
  // (MT x D / 4) too at D 32, else Q is re-read from shared memory each step.
  // Why 64 keys: each step's softmax, rescale test and two barriers weigh half as much against its mmas as with
  // 32. On the H200, D 64 went from 0.63-0.77x SDPA flash at 32 keys a step to 0.76-0.91x at 64; D 128 stayed
  // at 0.76-0.81x with 32. ptxas at 64 keys: 194 / 242 registers at D 32 / 64; 255 and a small spill at D 96
  // (28 bytes of spill stores on sm_90, 56 on sm_80) and D 128 (80 / 112), less than FlashAttention-2's own
  // 128 x 64 kernel at D 128 (255 registers, 172 bytes of spill stores on sm_80: flash-attention issue #1630).
  static constexpr int kFwdMTiles = 2;
  static constexpr int kFwdM = 16 * kWarps * kFwdMTiles, kFwdN = 64;
  static constexpr bool kFwdQInRegs = D <= 32;
  // dK/dV: 64 keys per block; queries per step shrink with D so that dK, dV (2 x D/2 fp32 per thread) plus
  // the S and dP tiles stay in registers
  static constexpr int kBwdN = 64, kBwdM = D <= 64 ? 64 : 32;
  // dQ: 64 queries per block; keys per step shrink with D for the same reason
  static constexpr int kDqM = 64, kDqN = D <= 64 ? 64 : 32;

  template <typename T>
  static constexpr int fwd_smem() { return (kFwdM + 2 * kFwdN) * kPitch * static_cast<int>(sizeof(T)); }
  template <typename T>
  static constexpr int dkdv_smem() {
    return (2 * kBwdN + 2 * kBwdM) * kPitch * static_cast<int>(sizeof(T)) + kBwdM * (2 + 1) * 4;  // + stats, delta
  }
  template <typename T>
  static constexpr int dq_smem() { return (2 * kDqM + 2 * kDqN) * kPitch * static_cast<int>(sizeof(T)); }
};

}  // namespace fa
