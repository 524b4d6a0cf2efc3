// The host-side contract between the binding (bindings.cpp, compiled by the host C++ compiler against torch's
// headers) and the launchers (*.cu, compiled by nvcc). Plain C++ only: no torch and no CUDA headers here, so
// each side compiles without the other's headers. Launchers return a cudaError_t value (0 = success).
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;  // the same declaration as CUDA's driver_types.h

namespace fa {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

const char* error_string(int error);

}  // namespace fa
