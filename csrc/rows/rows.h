// Parameters and launchers of the row ops (softmax, LayerNorm, RMSNorm) over a contiguous (rows, cols) matrix.
// Preconditions the binding guarantees: every pointer is 16-byte aligned, rows and cols are positive, weights
// and biases are float32 or of the rows' dtype (param_dtype; the binding converts any other to float32 once).
#pragma once

#include "../common/launch.h"

namespace fa {

struct SoftmaxParams {
  DType dtype;
  int64_t rows, cols;
  const void* x;     // forward: the input; backward: the forward's output y
  const void* dy;    // backward only: the gradient of y
  void* out;         // forward: y; backward: dx
  float* workspace;  // softmax_workspace_floats() floats; used when a row is longer than one block's registers
};

int64_t softmax_workspace_floats(const SoftmaxParams& p);
int softmax_forward(const SoftmaxParams& p, cudaStream_t stream);
int softmax_backward(const SoftmaxParams& p, cudaStream_t stream);

struct NormParams {
  DType dtype;
  int64_t rows, cols;
  bool rms;            // RMSNorm (no mean, no bias) instead of LayerNorm
  float eps;
  const void* x;
  const void* dy;      // backward only
  DType param_dtype;   // of weight, bias, dweight and dbias: float32 or dtype
  const void* weight;  // (cols,) or null
  const void* bias;    // (cols,) or null; LayerNorm forward only
  void* out;           // forward: y; backward: dx
  float* mean;         // (rows,): written by the forward, read by the backward; null for RMSNorm
  float* rstd;         // (rows,): likewise
  void* dweight;       // backward: (cols,), or null when there is no weight
  void* dbias;         // backward: (cols,), or null when there is no bias
  float* workspace;    // backward: norm_workspace_floats() floats, for the per-chunk partial sums
};

int64_t norm_workspace_floats(const NormParams& p);
int norm_forward(const NormParams& p, cudaStream_t stream);
int norm_backward(const NormParams& p, cudaStream_t stream);

}  // namespace fa
