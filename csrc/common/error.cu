#include <cuda_runtime.h>

#include "launch.h"

namespace fa {

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace fa
