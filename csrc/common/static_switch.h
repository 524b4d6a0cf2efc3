// Turn runtime values into compile-time template arguments in one place, so a dispatch function reads as a
// list of the instantiations that exist. Usage: FA_DTYPE_SWITCH(p.dtype, T, [&] { return launch<T>(p); });
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"

#define FA_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                 \
    if (COND) {                         \
      constexpr static bool NAME = true;  \
      return __VA_ARGS__();             \
    } else {                            \
      constexpr static bool NAME = false; \
      return __VA_ARGS__();             \
    }                                   \
  }()

// Row ops: float32, float16, bfloat16.
#define FA_FLOAT_DTYPE_SWITCH(DTYPE, T, ...)                                    \
  [&] {                                                                         \
    switch (DTYPE) {                                                            \
      case ::fa::DType::kFloat16: { using T = __half; return __VA_ARGS__(); }        \
      case ::fa::DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
      default: { using T = float; return __VA_ARGS__(); }                        \
    }                                                                           \
  }()

// Attention: float16 and bfloat16 only (the tensor-core inputs).
#define FA_HALF_DTYPE_SWITCH(DTYPE, T, ...)                                     \
  [&] {                                                                         \
    if (DTYPE == ::fa::DType::kBFloat16) { using T = __nv_bfloat16; return __VA_ARGS__(); } \
    using T = __half;                                                           \
    return __VA_ARGS__();                                                       \
  }()

// Row ops' parameters (a norm's weight and bias): of the rows' dtype T, or float32.
#define FA_PARAM_SWITCH(PARAM_DTYPE, DTYPE, T, PT, ...)  \
  [&] {                                                  \
    if (PARAM_DTYPE == DTYPE) { using PT = T; return __VA_ARGS__(); } \
    using PT = float;                                    \
    return __VA_ARGS__();                                \
  }()
