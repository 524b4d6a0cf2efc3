// The CUDA kernels' dropout decisions under the CPU emulation, for tests/test_cuda_emulated.py to compare with the
// Triton kernels': the two backends must drop the same probabilities for the same seed.
//   dropout_test uniforms          reads "seed offset" lines, prints philox_uniform's float bits, one hex word a line
//   dropout_test mask B H Lq Lk P SEED   prints dropout_keep of every (b, h, row, col) as one line of 0s and 1s
#include <cstdio>
#include <cstring>
#include <string>

#include "attention/primitives.cuh"
#include "emu.h"

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "uniforms") {
    unsigned long long seed, offset;
    while (std::scanf("%llu %llu", &seed, &offset) == 2) {
      const float u = fa::philox_uniform(seed, offset);
      uint32_t bits;
      std::memcpy(&bits, &u, sizeof bits);
      std::printf("%08x\n", bits);
    }
    return 0;
  }
  if (argc == 8 && std::string(argv[1]) == "mask") {
    fa::AttentionParams p{};
    const int B = std::stoi(argv[2]);
    p.heads = std::stoi(argv[3]), p.q_len = std::stoi(argv[4]), p.k_len = std::stoi(argv[5]);
    p.dropout_p = static_cast<float>(std::stod(argv[6]));  // as Python passes a float to either backend
    p.seed = std::stoull(argv[7]);
    std::string keep;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < p.heads; ++h)
        for (int i = 0; i < p.q_len; ++i)
          for (int j = 0; j < p.k_len; ++j) keep += fa::dropout_keep(p, b, h, i, j) ? '1' : '0';
    std::printf("%s\n", keep.c_str());
    return 0;
  }
  std::fprintf(stderr, "usage: dropout_test uniforms < pairs | dropout_test mask B H Lq Lk P SEED\n");
  return 2;
}
