// fast_attention._C: the op boundary of the CUDA backend. Validates tensors once (device, dtype, shapes,
// layout), allocates outputs and workspaces, fills a params struct and calls a launcher on torch's current
// stream. Compiled by the host C++ compiler against torch's headers only; the kernels live in the nvcc-built
// objects behind common/launch.h, attention/flash.h and rows/rows.h.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#ifdef FA_STREAM_FROM_C10_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "attention/flash.h"
#include "rows/rows.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ------------------------------------------------------------------------------------------------ checks
void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fast_attention._C.", op, ": ", name, " must be a CUDA tensor, got a tensor on ",
              t.device(), " (the cuda backend runs on CUDA tensors only)");
}

void check_same_device(const Tensor& t, const Tensor& first, const char* op, const char* name,
                       const char* first_name) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.device() == first.device(), "fast_attention._C.", op, ": ", name, " is on ", t.device(),
              " but ", first_name, " is on ", first.device());
}

fa::DType row_dtype(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return fa::DType::kFloat32;
    case at::kHalf: return fa::DType::kFloat16;
    case at::kBFloat16: return fa::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fast_attention._C.", op, ": ", name,
                       " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

fa::DType attention_dtype(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "fast_attention._C.", op,
                   ": ", name, " must be float16 or bfloat16 (the tensor-core kernels' inputs), got ",
                   t.scalar_type());
  return t.scalar_type() == at::kHalf ? fa::DType::kFloat16 : fa::DType::kBFloat16;
}

void check_same_dtype(const Tensor& t, const Tensor& first, const char* op, const char* name,
                      const char* first_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), "fast_attention._C.", op, ": ", name, " has dtype ",
                   t.scalar_type(), " but ", first_name, " has ", first.scalar_type());
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The kernels read 16-byte vectors from 16-byte aligned rows' base: a contiguous tensor whose storage starts
// aligned (a fresh copy in the rare case of a view that starts mid-vector).
Tensor aligned_contiguous(const Tensor& t) {
  Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone(at::MemoryFormat::Contiguous);
}

// Attention tiles load with 16-byte cp.async from any (batch, head, row): the last dim contiguous and every
// other stride a multiple of 8 elements. Otherwise a contiguous copy.
Tensor attention_layout(const Tensor& t) {
  bool ok = t.stride(-1) == 1 && aligned16(t);
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_rows(const Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2, "fast_attention._C.", op, ": ", name, " must be a 2-D (rows, cols) matrix, got ",
                    x.dim(), " dims");
}

void check_stat(const Tensor& s, const Tensor& x, const char* op, const char* name) {
  check_same_device(s, x, op, name, "x");
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "fast_attention._C.", op, ": ", name, " must be float32, got ",
                   s.scalar_type());
  TORCH_CHECK_VALUE(s.numel() == x.size(0), "fast_attention._C.", op, ": ", name, " must have one value per row (",
                    x.size(0), "), got ", s.numel());
}

// A norm's weight and bias, checked, in the dtype the kernels read them in: the rows' dtype when every one
// present has it (a model's own parameters: read as they are, no conversion and no launch), else float32 (one
// conversion of `cols` values each). Their gradients come back in that dtype.
struct NormAffine {
  Tensor weight, bias;
  at::ScalarType dtype;
  fa::DType kernel_dtype;  // the same, as NormParams::param_dtype
};

NormAffine norm_affine(const OptTensor& weight, const OptTensor& bias, const Tensor& x, const char* op) {
  bool native = true;
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!t->has_value()) continue;
    const Tensor& w = **t;
    check_same_device(w, x, op, name, "x");
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), "fast_attention._C.", op, ": ", name,
                     " must be a floating-point tensor, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.numel() == x.size(1), "fast_attention._C.", op, ": ", name, " must have ", x.size(1),
                      " elements (one per column), got ", w.numel());
    native = native && w.scalar_type() == x.scalar_type();
  }
  const at::ScalarType dtype = native ? x.scalar_type() : at::kFloat;
  // 16-byte aligned: the kernels read them as 16-byte vectors
  const auto as_read = [&](const OptTensor& t) { return t.has_value() ? aligned_contiguous(t->to(dtype)) : Tensor(); };
  return {as_read(weight), as_read(bias), dtype, native ? row_dtype(x, op, "x") : fa::DType::kFloat32};
}

void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
float* f32_ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

cudaStream_t current_stream(const Tensor& t) {
#ifdef FA_STREAM_FROM_C10_CUDA  // torch < 2.11 (CUDA wheels): no c10::Stream::native_handle yet
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#else
  return static_cast<cudaStream_t>(
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle());
#endif
}

// fp32 scratch of n floats on like's device, or none when n is 0; points `ptr` at it. Keep the returned tensor
// alive until the launch is queued.
Tensor float_workspace(int64_t n, const Tensor& like, float*& ptr) {
  if (n == 0) return Tensor();
  Tensor ws = at::empty({n}, like.options().dtype(at::kFloat));
  ptr = ws.data_ptr<float>();
  return ws;
}

void check_launch(int error, const char* op) {
  TORCH_CHECK(error == 0, "fast_attention._C.", op, ": CUDA error: ", fa::error_string(error));
}

// ------------------------------------------------------------------------------------------------ softmax
Tensor softmax_forward(const Tensor& x_in) {
  constexpr const char* op = "softmax_forward";
  check_cuda(x_in, op, "x");
  check_rows(x_in, op, "x");
  fa::SoftmaxParams p{};
  p.dtype = row_dtype(x_in, op, "x");
  c10::DeviceGuard guard(x_in.device());
  const Tensor x = aligned_contiguous(x_in);
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.x = x.data_ptr();
  p.out = y.data_ptr();
  const Tensor ws = float_workspace(fa::softmax_workspace_floats(p), x, p.workspace);
  check_launch(fa::softmax_forward(p, current_stream(x)), op);
  return y;
}

Tensor softmax_backward(const Tensor& y_in, const Tensor& dy_in) {
  constexpr const char* op = "softmax_backward";
  check_cuda(y_in, op, "y");
  check_same_device(dy_in, y_in, op, "dy", "y");
  check_rows(y_in, op, "y");
  TORCH_CHECK_VALUE(dy_in.sizes() == y_in.sizes(), "fast_attention._C.", op, ": dy must have y's shape ",
                    y_in.sizes(), ", got ", dy_in.sizes());
  fa::SoftmaxParams p{};
  p.dtype = row_dtype(y_in, op, "y");
  check_same_dtype(dy_in, y_in, op, "dy", "y");
  c10::DeviceGuard guard(y_in.device());
  const Tensor y = aligned_contiguous(y_in), dy = aligned_contiguous(dy_in);
  Tensor dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return dx;
  p.rows = y.size(0);
  p.cols = y.size(1);
  p.x = y.data_ptr();
  p.dy = dy.data_ptr();
  p.out = dx.data_ptr();
  const Tensor ws = float_workspace(fa::softmax_workspace_floats(p), y, p.workspace);
  check_launch(fa::softmax_backward(p, current_stream(y)), op);
  return dx;
}

// ------------------------------------------------------------------------------------- LayerNorm, RMSNorm
std::tuple<Tensor, Tensor, Tensor> norm_forward(const Tensor& x_in, const OptTensor& weight, const OptTensor& bias,
                                                double eps, bool rms, const char* op) {
  check_cuda(x_in, op, "x");
  check_rows(x_in, op, "x");
  fa::NormParams p{};
  p.dtype = row_dtype(x_in, op, "x");
  c10::DeviceGuard guard(x_in.device());
  const NormAffine affine = norm_affine(weight, bias, x_in, op);
  const Tensor x = aligned_contiguous(x_in);
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor mean = rms ? Tensor() : at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, mean, rstd};
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.rms = rms;
  p.eps = static_cast<float>(eps);
  p.x = x.data_ptr();
  p.param_dtype = affine.kernel_dtype;
  p.weight = ptr_or_null(affine.weight);
  p.bias = ptr_or_null(affine.bias);
  p.out = y.data_ptr();
  p.mean = f32_ptr(mean);
  p.rstd = f32_ptr(rstd);
  check_launch(fa::norm_forward(p, current_stream(x)), op);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const OptTensor& weight,
                                                      const OptTensor& bias, double eps) {
  return norm_forward(x, weight, bias, eps, false, "layer_norm_forward");
}

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x, const OptTensor& weight, double eps) {
  auto [y, mean, rstd] = norm_forward(x, weight, std::nullopt, eps, true, "rms_norm_forward");
  return {y, rstd};
}

// dweight / dbias come back in the dtype norm_affine read the weight in, float32 without a weight (a 16-bit sum
// of many rows' dy overflows), or undefined when not asked for; the Python side casts them to the parameters'
// dtype where that differs.
std::tuple<Tensor, Tensor, Tensor> norm_backward(const Tensor& dy_in, const Tensor& x_in, const OptTensor& weight,
                                                 const OptTensor& mean_in, const Tensor& rstd_in, bool need_dbias,
                                                 bool rms, const char* op) {
  check_cuda(x_in, op, "x");
  check_same_device(dy_in, x_in, op, "dy", "x");
  check_rows(x_in, op, "x");
  TORCH_CHECK_VALUE(dy_in.sizes() == x_in.sizes(), "fast_attention._C.", op, ": dy must have x's shape ",
                    x_in.sizes(), ", got ", dy_in.sizes());
  fa::NormParams p{};
  p.dtype = row_dtype(x_in, op, "x");
  check_same_dtype(dy_in, x_in, op, "dy", "x");
  if (mean_in.has_value()) check_stat(*mean_in, x_in, op, "mean");
  check_stat(rstd_in, x_in, op, "rstd");
  c10::DeviceGuard guard(x_in.device());
  const NormAffine affine = weight.has_value() ? norm_affine(weight, std::nullopt, x_in, op)
                                               : NormAffine{Tensor(), Tensor(), at::kFloat, fa::DType::kFloat32};
  const Tensor& w = affine.weight;
  const Tensor x = aligned_contiguous(x_in), dy = aligned_contiguous(dy_in);
  const Tensor mean = mean_in.has_value() ? mean_in->contiguous() : Tensor();
  const Tensor rstd = rstd_in.contiguous();
  Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const auto grad_options = x.options().dtype(affine.dtype);
  // The kernels write every column of dw / db; without rows the sums are zeros.
  const auto param_grad = [&](bool needed) {
    if (!needed) return Tensor();
    return x.numel() == 0 ? at::zeros({x.size(1)}, grad_options) : at::empty({x.size(1)}, grad_options);
  };
  Tensor dw = param_grad(w.defined());
  Tensor db = param_grad(need_dbias);
  if (x.numel() == 0) return {dx, dw, db};
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.rms = rms;
  p.x = x.data_ptr();
  p.dy = dy.data_ptr();
  p.param_dtype = affine.kernel_dtype;
  p.weight = ptr_or_null(w);
  p.out = dx.data_ptr();
  p.mean = rms ? nullptr : f32_ptr(mean);
  p.rstd = f32_ptr(rstd);
  p.dweight = ptr_or_null(dw);
  p.dbias = ptr_or_null(db);
  const Tensor ws = dw.defined() || db.defined() ? float_workspace(fa::norm_workspace_floats(p), x, p.workspace)
                                                  : Tensor();
  check_launch(fa::norm_backward(p, current_stream(x)), op);
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                                                       const Tensor& mean, const Tensor& rstd, bool need_dbias) {
  constexpr const char* op = "layer_norm_backward";
  check_cuda(mean, op, "mean");
  return norm_backward(dy, x, weight, mean, rstd, need_dbias, false, op);
}

std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                                             const Tensor& rstd) {
  auto [dx, dw, db] = norm_backward(dy, x, weight, std::nullopt, rstd, false, true, "rms_norm_backward");
  return {dx, dw};
}

// ------------------------------------------------------------------------------------------------ attention
struct AttentionInputs {
  Tensor q, k, v, mask, cu_seq_q, cu_seq_k, seqused_k, block_table;
};

// The kernels index rows in 32-bit ints and step past the last row by up to one tile (64): keep that room.
constexpr int64_t kMaxLen = INT32_MAX - 128;

void check_head_dim(int64_t D, const char* op) {
  bool known = false;
  std::string dims;
  for (int d : fa::kHeadDims) {
    known = known || d == D;
    dims += (dims.empty() ? "" : ", ") + std::to_string(d);
  }
  TORCH_CHECK_VALUE(known, "fast_attention._C.", op, ": head dim ", D, " has no compiled kernel; supported head dims: ",
                    dims);
}

// Checks shared by the attention entry points; fills the sizes, q/k/v and mask fields of `p`.
AttentionInputs attention_inputs(fa::AttentionParams& p, const Tensor& q_in, const Tensor& k_in,
                                 const OptTensor& v_in, const OptTensor& mask_in, bool causal, double scale,
                                 const char* op, bool tiled) {
  check_cuda(q_in, op, "query");
  check_same_device(k_in, q_in, op, "key", "query");
  if (v_in.has_value()) check_same_device(*v_in, q_in, op, "value", "query");
  if (mask_in.has_value()) check_same_device(*mask_in, q_in, op, "attn_mask", "query");
  p.dtype = attention_dtype(q_in, op, "query");
  check_same_dtype(k_in, q_in, op, "key", "query");
  if (v_in.has_value()) check_same_dtype(*v_in, q_in, op, "value", "query");
  TORCH_CHECK_VALUE(q_in.dim() == 4 && k_in.dim() == 4 && (!v_in.has_value() || v_in->dim() == 4),
                    "fast_attention._C.", op, ": query, key and value must be 4-D (B, H, L, D)");
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Lk = k_in.size(2);
  TORCH_CHECK_VALUE(k_in.size(0) == B && k_in.size(3) == D, "fast_attention._C.", op, ": key must be (", B,
                    ", Hkv, Lk, ", D, "), got ", k_in.sizes());
  if (v_in.has_value())
    TORCH_CHECK_VALUE(v_in->sizes() == k_in.sizes(), "fast_attention._C.", op,
                      ": value must have key's shape (the same head dim as query), got ", v_in->sizes(), " and ",
                      k_in.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "fast_attention._C.", op, ": query's heads (", H,
                    ") must be a multiple of key's heads (", Hkv, ")");
  TORCH_CHECK_VALUE(Lq < kMaxLen && Lk < kMaxLen && B * H < INT32_MAX, "fast_attention._C.", op,
                    ": sequence lengths must be below 2^31 - 129 and batch * heads below 2^31");
  if (tiled) check_head_dim(D, op);
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(Hkv);
  p.q_len = static_cast<int>(Lq);
  p.k_len = static_cast<int>(Lk);
  p.head_dim = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.causal = causal;

  AttentionInputs in;
  in.q = tiled ? attention_layout(q_in) : q_in.contiguous();
  in.k = tiled ? attention_layout(k_in) : k_in.contiguous();
  p.q = in.q.data_ptr();
  p.q_batch_stride = in.q.stride(0), p.q_head_stride = in.q.stride(1), p.q_row_stride = in.q.stride(2);
  p.k = in.k.data_ptr();
  p.k_batch_stride = in.k.stride(0), p.k_head_stride = in.k.stride(1), p.k_row_stride = in.k.stride(2);
  if (v_in.has_value()) {
    in.v = attention_layout(*v_in);
    p.v = in.v.data_ptr();
    p.v_batch_stride = in.v.stride(0), p.v_head_stride = in.v.stride(1), p.v_row_stride = in.v.stride(2);
  }
  p.mask_kind = fa::MaskKind::kNone;
  if (mask_in.has_value()) {
    const Tensor& m = *mask_in;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == q_in.scalar_type(), "fast_attention._C.", op,
                     ": attn_mask must be bool or have query's dtype, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 4 && m.size(0) == B && m.size(1) == H && m.size(2) == Lq && m.size(3) == Lk,
                      "fast_attention._C.", op, ": attn_mask must be expanded to (B, H, Lq, Lk) = (", B, ", ", H,
                      ", ", Lq, ", ", Lk, "), got ", m.sizes());
    TORCH_CHECK_VALUE(!causal, "fast_attention._C.", op, ": pass attn_mask or causal, not both");
    in.mask = m;  // read through its strides (0 where broadcast), never copied
    p.mask_kind = m.scalar_type() == at::kBool ? fa::MaskKind::kBool : fa::MaskKind::kAdditive;
    p.mask = m.data_ptr();
    p.mask_batch_stride = m.stride(0), p.mask_head_stride = m.stride(1);
    p.mask_q_stride = m.stride(2), p.mask_k_stride = m.stride(3);
  }
  return in;
}

// The forward's row statistics (2, B, H, Lq) fp32 (flash.h: row_max, row_log_sum) into p, read from `held`, a
// contiguous copy the caller keeps alive for the launch.
void set_stats(fa::AttentionParams& p, const Tensor& stats, Tensor& held, const Tensor& q, const char* op) {
  check_same_device(stats, q, op, "stats", "query");
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, "fast_attention._C.", op, ": stats must be float32, got ",
                   stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 4 && stats.size(0) == 2 && stats.size(1) == p.batch && stats.size(2) == p.heads &&
                        stats.size(3) == p.q_len,
                    "fast_attention._C.", op, ": stats must be (2, B, H, Lq) = (2, ", p.batch, ", ", p.heads, ", ",
                    p.q_len, "), got ", stats.sizes());
  held = stats.contiguous();
  p.row_max = held.data_ptr<float>();
  p.row_log_sum = p.row_max + held.size(1) * held.size(2) * held.size(3);
}

// The backward's dout and out: query's dtype and shape.
void check_like_query(const Tensor& dout, const Tensor& out, const Tensor& q, const char* op) {
  check_same_dtype(dout, q, op, "dout", "query");
  check_same_dtype(out, q, op, "out", "query");
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "fast_attention._C.", op,
                    ": dout and out must have query's shape ", q.sizes(), ", got ", dout.sizes(), " and ",
                    out.sizes());
}

// The gradients' pointers and strides into p: (B, H, L, D) tensors, or packed (total, H, D) ones, whose batch
// stride is 0 (flash.h: cu_seq_q).
void set_grads(fa::AttentionParams& p, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const bool packed = dq.dim() == 3;
  const auto strides = [&](const Tensor& t, int64_t& batch, int64_t& head, int64_t& row) {
    batch = packed ? 0 : t.stride(0), head = t.stride(1), row = t.stride(packed ? 0 : 2);
  };
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  strides(dq, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride);
  strides(dk, p.dkv_batch_stride, p.dkv_head_stride, p.dkv_row_stride);  // dv: allocated like dk
}

// Dropout's probability and seed (fast_attention's op draws the seed from torch's generator per call).
void set_dropout(fa::AttentionParams& p, double dropout_p, int64_t seed, const char* op) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "fast_attention._C.", op,
                    ": dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));  // as the Triton launcher computes it
  p.seed = static_cast<uint64_t>(seed);
}

// The logit cap and the local window (flash.h: softcap, window) into p, after set_dropout; a side of -1 bounds
// nothing.
void set_scores(fa::AttentionParams& p, double softcap, int64_t window_left, int64_t window_right, const char* op) {
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(softcap), "fast_attention._C.", op,
                    ": softcap must be a finite number >= 0 (0: no cap), got ", softcap);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "fast_attention._C.", op,
                    ": window_left and window_right must be >= 0, or -1 for no bound, got ", window_left, " and ",
                    window_right);
  const auto side = [](int64_t s) { return s < 0 || s >= fa::kNoWindow ? fa::kNoWindow : static_cast<int>(s); };
  // instances.h: the dropout kernels leave out the cap's and the window's code
  TORCH_CHECK_NOT_IMPLEMENTED((softcap == 0.0 && window_left < 0 && window_right < 0) || p.dropout_p == 0.f,
                              "fast_attention._C.", op,
                              ": the kernels take no dropout with a logit cap (softcap) or a local window");
  p.softcap = static_cast<float>(softcap);
  p.window = window_left >= 0 || window_right >= 0;
  p.window_left = side(window_left);
  p.window_right = side(window_right);
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const OptTensor& mask, bool causal, double scale, double dropout_p,
                                             int64_t seed, double softcap, int64_t window_left,
                                             int64_t window_right) {
  constexpr const char* op = "attention_forward";
  fa::AttentionParams p{};
  check_cuda(q, op, "query");
  c10::DeviceGuard guard(q.device());
  const AttentionInputs in = attention_inputs(p, q, k, v, mask, causal, scale, op, true);
  set_dropout(p, dropout_p, seed, op);
  set_scores(p, softcap, window_left, window_right, op);
  Tensor out = at::empty({p.batch, p.heads, p.q_len, p.head_dim}, q.options());
  Tensor stats = at::empty({2, p.batch, p.heads, p.q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || p.k_len == 0) {  // every row dead: max -inf, log sum 0
    stats[0].fill_(-INFINITY);
    stats[1].zero_();
    return {out.zero_(), stats};
  }
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1), p.o_row_stride = out.stride(2);
  Tensor held;
  set_stats(p, stats, held, q, op);
  const Tensor ws = float_workspace(fa::attention_forward_workspace_floats(p), q, p.split_out);
  check_launch(fa::attention_forward(p, current_stream(q)), op);
  return {out, stats};
}

// -> dq, dk, dv, and with mask_grad the float mask's gradient dS (B, H, Lq, Lk) fp32 (else None).
std::tuple<Tensor, Tensor, Tensor, Tensor> attention_backward(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& stats,
    const OptTensor& mask, bool causal, double scale, double dropout_p, int64_t seed, double softcap,
    int64_t window_left, int64_t window_right, bool mask_grad) {
  constexpr const char* op = "attention_backward";
  fa::AttentionParams p{};
  check_cuda(q, op, "query");
  check_same_device(dout, q, op, "dout", "query");
  check_same_device(out, q, op, "out", "query");
  c10::DeviceGuard guard(q.device());
  const AttentionInputs in = attention_inputs(p, q, k, v, mask, causal, scale, op, true);
  set_dropout(p, dropout_p, seed, op);
  set_scores(p, softcap, window_left, window_right, op);
  TORCH_CHECK_VALUE(!mask_grad || p.mask_kind == fa::MaskKind::kAdditive, "fast_attention._C.", op,
                    ": mask_grad needs a float (additive) attn_mask");
  // flash.h: the dQ kernel writes dS before the cap's slope only where it does not cap
  TORCH_CHECK_NOT_IMPLEMENTED(!mask_grad || softcap == 0.0, "fast_attention._C.", op,
                              ": the kernels give no mask gradient with a logit cap (softcap)");
  Tensor held;
  set_stats(p, stats, held, q, op);
  check_like_query(dout, out, q, op);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor dmask;  // undefined: None in Python
  if (mask_grad) {
    dmask = at::zeros({p.batch, p.heads, p.q_len, p.k_len}, q.options().dtype(at::kFloat));
    p.dmask = dmask.data_ptr<float>();
  }
  if (dq.numel() == 0 || p.k_len == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dmask};
  const Tensor d = attention_layout(dout), o = attention_layout(out);
  Tensor delta = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(at::kFloat));
  p.dout = d.data_ptr();
  p.do_batch_stride = d.stride(0), p.do_head_stride = d.stride(1), p.do_row_stride = d.stride(2);
  p.out = o.data_ptr();
  p.o_batch_stride = o.stride(0), p.o_head_stride = o.stride(1), p.o_row_stride = o.stride(2);
  p.delta = delta.data_ptr<float>();
  set_grads(p, dq, dk, dv);
  check_launch(fa::attention_backward(p, current_stream(q)), op);
  return {dq, dk, dv, dmask};
}

Tensor attention_weights(const Tensor& q, const Tensor& k, const Tensor& stats, const OptTensor& mask, bool causal,
                         double scale, double softcap, int64_t window_left, int64_t window_right) {
  constexpr const char* op = "attention_weights";
  fa::AttentionParams p{};
  check_cuda(q, op, "query");
  c10::DeviceGuard guard(q.device());
  const AttentionInputs in = attention_inputs(p, q, k, std::nullopt, mask, causal, scale, op, false);
  set_scores(p, softcap, window_left, window_right, op);  // dropout_p 0: the weights are before dropout
  Tensor held;
  set_stats(p, stats, held, q, op);
  Tensor weights = at::empty({p.batch, p.heads, p.q_len, p.k_len}, q.options().dtype(at::kFloat));
  if (weights.numel() == 0) return weights;
  p.weights = weights.data_ptr<float>();
  check_launch(fa::attention_weights(p, current_stream(q)), op);
  return weights;
}

// ------------------------------------------------------------------------------------------ packed sequences
// fa.varlen_attn (flash.h: cu_seq_q): q (total_q, H, D), k and v (total_k, Hkv, D), cu_seq_q and cu_seq_k B + 1
// int32 offsets on q's device, trusted as FlashAttention trusts them (fast_attention/ops/varlen.py checks them
// where they are on the host), max_q and max_k at least the longest sequence's lengths. The window aligns
// bottom-right in each sequence (causal is the window (-1, 0)); no mask and no dropout. paged: k and v are pools of
// pages (pages, page_size, Hkv, D) instead (flash.h: block_table; varlen_forward sets the table).
AttentionInputs varlen_inputs(fa::AttentionParams& p, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                              const Tensor& cu_seq_q, const Tensor& cu_seq_k, int64_t max_q, int64_t max_k,
                              double scale, const char* op, bool paged = false) {
  check_cuda(q_in, op, "query");
  check_same_device(k_in, q_in, op, "key", "query");
  check_same_device(v_in, q_in, op, "value", "query");
  check_same_device(cu_seq_q, q_in, op, "cu_seq_q", "query");
  check_same_device(cu_seq_k, q_in, op, "cu_seq_k", "query");
  p.dtype = attention_dtype(q_in, op, "query");
  check_same_dtype(k_in, q_in, op, "key", "query");
  check_same_dtype(v_in, q_in, op, "value", "query");
  const int64_t kv_dims = paged ? 4 : 3;
  TORCH_CHECK_VALUE(q_in.dim() == 3 && k_in.dim() == kv_dims && v_in.dim() == kv_dims, "fast_attention._C.", op,
                    paged ? ": query must be 3-D (total, H, D), key and value 4-D pools (pages, page size, Hkv, D)"
                          : ": query, key and value must be 3-D (total, H, D)");
  const int64_t H = q_in.size(1), D = q_in.size(2), Hkv = k_in.size(-2);
  TORCH_CHECK_VALUE(k_in.size(-1) == D, "fast_attention._C.", op, ": key must be (",
                    paged ? "pages, page size" : "total_k", ", Hkv, ", D, "), got ", k_in.sizes());
  TORCH_CHECK_VALUE(v_in.sizes() == k_in.sizes(), "fast_attention._C.", op,
                    ": value must have key's shape (the same head dim as query), got ", v_in.sizes(), " and ",
                    k_in.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "fast_attention._C.", op, ": query's heads (", H,
                    ") must be a multiple of key's heads (", Hkv, ")");
  for (const auto& [name, cu] : {std::pair{"cu_seq_q", &cu_seq_q}, std::pair{"cu_seq_k", &cu_seq_k}})
    TORCH_CHECK_VALUE(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->size(0) == cu_seq_q.size(0) &&
                          cu->size(0) >= 1,
                      "fast_attention._C.", op, ": ", name, " must be 1-D int32 with B + 1 offsets, as many as ",
                      "cu_seq_q's; got ", cu->scalar_type(), " of shape ", cu->sizes());
  const int64_t B = cu_seq_q.size(0) - 1;
  TORCH_CHECK_VALUE(q_in.size(0) < kMaxLen && k_in.size(0) < kMaxLen && max_q >= 0 && max_q < kMaxLen &&
                        max_k >= 0 && max_k < kMaxLen && B * H < INT32_MAX,
                    "fast_attention._C.", op, ": total_q, total_k, max_q and max_k must be in [0, 2^31 - 129) and "
                    "batch * heads below 2^31, got ", q_in.size(0), ", ", k_in.size(0), ", ", max_q, ", ", max_k);
  check_head_dim(D, op);
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(Hkv);
  p.q_len = static_cast<int>(max_q);  // the grid's; each block reads its sequence's own
  p.k_len = static_cast<int>(max_k);
  p.total_q = static_cast<int>(q_in.size(0));
  p.head_dim = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.mask_kind = fa::MaskKind::kNone;

  AttentionInputs in;
  in.cu_seq_q = cu_seq_q.contiguous(), in.cu_seq_k = cu_seq_k.contiguous();
  p.cu_seq_q = in.cu_seq_q.data_ptr<int>(), p.cu_seq_k = in.cu_seq_k.data_ptr<int>();
  in.q = attention_layout(q_in), in.k = attention_layout(k_in), in.v = attention_layout(v_in);
  p.q = in.q.data_ptr(), p.k = in.k.data_ptr(), p.v = in.v.data_ptr();
  p.q_head_stride = in.q.stride(1), p.q_row_stride = in.q.stride(0);  // batch strides 0: the offsets place rows
  p.k_head_stride = in.k.stride(-2), p.k_row_stride = in.k.stride(-3);  // paged: rows within a page
  p.v_head_stride = in.v.stride(-2), p.v_row_stride = in.v.stride(-3);
  if (paged) {
    p.k_page_stride = in.k.stride(0), p.v_page_stride = in.v.stride(0);
    p.page_size = static_cast<int>(in.k.size(1));
  }
  return in;
}

// Packed statistics (2, H, total_q) fp32 into p, read from `held`, a contiguous copy kept alive for the launch.
void set_varlen_stats(fa::AttentionParams& p, const Tensor& stats, Tensor& held, const Tensor& q, const char* op) {
  check_same_device(stats, q, op, "stats", "query");
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, "fast_attention._C.", op, ": stats must be float32, got ",
                   stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(0) == 2 && stats.size(1) == p.heads && stats.size(2) == p.total_q,
                    "fast_attention._C.", op, ": stats must be (2, H, total_q) = (2, ", p.heads, ", ", p.total_q,
                    "), got ", stats.sizes());
  held = stats.contiguous();
  p.row_max = held.data_ptr<float>();
  p.row_log_sum = p.row_max + held.size(1) * held.size(2);
}

std::tuple<Tensor, Tensor> varlen_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seq_q,
                                          const Tensor& cu_seq_k, int64_t max_q, int64_t max_k, double scale,
                                          double softcap, int64_t window_left, int64_t window_right,
                                          const OptTensor& seqused_k, const OptTensor& block_table,
                                          int64_t num_splits) {
  constexpr const char* op = "varlen_forward";
  fa::AttentionParams p{};
  check_cuda(q, op, "query");
  c10::DeviceGuard guard(q.device());
  AttentionInputs in = varlen_inputs(p, q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, op, block_table.has_value());
  set_scores(p, softcap, window_left, window_right, op);
  TORCH_CHECK_VALUE(num_splits >= 0 && num_splits < INT32_MAX, "fast_attention._C.", op,
                    ": num_splits must be 0 (the kernels choose) or a positive int, got ", num_splits);
  p.num_splits = static_cast<int>(num_splits);
  if (block_table) {  // a paged KV cache: entries trusted as the offsets are (each used one a page of the pools)
    check_same_device(*block_table, q, op, "block_table", "query");
    TORCH_CHECK_VALUE(block_table->scalar_type() == at::kInt && block_table->dim() == 2 &&
                          block_table->size(0) == p.batch && block_table->size(1) < INT32_MAX,
                      "fast_attention._C.", op, ": block_table must be 2-D int32 (B = ", p.batch,
                      ", pages per sequence), got ", block_table->scalar_type(), " of shape ", block_table->sizes());
    TORCH_CHECK_VALUE(seqused_k.has_value(), "fast_attention._C.", op, ": block_table needs seqused_k, each "
                      "sequence's number of keys in its pages");
    TORCH_CHECK_VALUE(p.page_size > 0, "fast_attention._C.", op, ": key's pages must hold at least one row, got ",
                      k.sizes());
    in.block_table = block_table->contiguous();
    p.block_table = in.block_table.data_ptr<int>();
    p.block_table_stride = in.block_table.stride(0);
  }
  if (seqused_k) {  // a KV cache's used keys, trusted as the offsets are: each at most its sequence's keys
    check_same_device(*seqused_k, q, op, "seqused_k", "query");
    TORCH_CHECK_VALUE(seqused_k->scalar_type() == at::kInt && seqused_k->dim() == 1 && seqused_k->size(0) == p.batch,
                      "fast_attention._C.", op, ": seqused_k must be 1-D int32 with B = ", p.batch, " counts, got ",
                      seqused_k->scalar_type(), " of shape ", seqused_k->sizes());
    in.seqused_k = seqused_k->contiguous();
    p.seqused_k = in.seqused_k.data_ptr<int>();
  }
  Tensor out = at::empty({p.total_q, p.heads, p.head_dim}, q.options());
  Tensor stats = at::empty({2, p.heads, p.total_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || p.batch == 0 || p.q_len == 0 || p.k_len == 0) {  // every row dead: max -inf, log sum 0
    stats[0].fill_(-INFINITY);
    stats[1].zero_();
    return {out.zero_(), stats};
  }
  p.out = out.data_ptr();
  p.o_head_stride = out.stride(1), p.o_row_stride = out.stride(0);
  Tensor held;
  set_varlen_stats(p, stats, held, q, op);
  const Tensor ws = float_workspace(fa::attention_forward_workspace_floats(p), q, p.split_out);  // decoding's parts
  check_launch(fa::attention_forward(p, current_stream(q)), op);
  return {out, stats};
}

std::tuple<Tensor, Tensor, Tensor> varlen_backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& out, const Tensor& stats,
                                                   const Tensor& cu_seq_q, const Tensor& cu_seq_k, int64_t max_q,
                                                   int64_t max_k, double scale, double softcap, int64_t window_left,
                                                   int64_t window_right) {
  constexpr const char* op = "varlen_backward";
  fa::AttentionParams p{};
  check_cuda(q, op, "query");
  check_same_device(dout, q, op, "dout", "query");
  check_same_device(out, q, op, "out", "query");
  c10::DeviceGuard guard(q.device());
  const AttentionInputs in = varlen_inputs(p, q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, op);
  set_scores(p, softcap, window_left, window_right, op);
  Tensor held;
  set_varlen_stats(p, stats, held, q, op);
  check_like_query(dout, out, q, op);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() == 0 || dk.numel() == 0 || p.batch == 0 || p.q_len == 0 || p.k_len == 0)
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  const Tensor d = attention_layout(dout), o = attention_layout(out);
  Tensor delta = at::empty({p.heads, p.total_q}, q.options().dtype(at::kFloat));
  p.dout = d.data_ptr();
  p.do_head_stride = d.stride(1), p.do_row_stride = d.stride(0);
  p.out = o.data_ptr();
  p.o_head_stride = o.stride(1), p.o_row_stride = o.stride(0);
  p.delta = delta.data_ptr<float>();
  set_grads(p, dq, dk, dv);
  check_launch(fa::attention_backward(p, current_stream(q)), op);
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fast_attention's CUDA kernels. Use them through fast_attention (backend='cuda').";
  m.def("softmax_forward", &softmax_forward, "softmax over the last dim of x (rows, cols)", py::arg("x"));
  m.def("softmax_backward", &softmax_backward, "dx from the forward's output y and dy", py::arg("y"),
        py::arg("dy"));
  m.def("layer_norm_forward", &layer_norm_forward, "-> (y, mean fp32, rstd fp32)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_backward", &layer_norm_backward,
        "-> (dx, dweight | None, dbias | None), in the weight's dtype where it is x's, else fp32",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("need_dbias"));
  m.def("rms_norm_forward", &rms_norm_forward, "-> (y, rstd fp32)", py::arg("x"), py::arg("weight"),
        py::arg("eps"));
  m.def("rms_norm_backward", &rms_norm_backward, "-> (dx, dweight | None), dweight as layer_norm_backward's",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("rstd"));
  m.def("attention_forward", &attention_forward, "-> (out, stats fp32 (2, B, H, Lq): row max, log row sum; base 2)",
        py::arg("query"),
        py::arg("key"), py::arg("value"), py::arg("attn_mask"), py::arg("is_causal"), py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("softcap") = 0.0, py::arg("window_left") = -1,
        py::arg("window_right") = -1);
  m.def("attention_backward", &attention_backward,
        "-> (dq, dk, dv, dmask): dmask, with mask_grad, the float mask's gradient (B, H, Lq, Lk) fp32, else None",
        py::arg("dout"), py::arg("query"), py::arg("key"), py::arg("value"), py::arg("out"), py::arg("stats"),
        py::arg("attn_mask"), py::arg("is_causal"), py::arg("scale"), py::arg("dropout_p") = 0.0, py::arg("seed") = 0,
        py::arg("softcap") = 0.0, py::arg("window_left") = -1, py::arg("window_right") = -1,
        py::arg("mask_grad") = false);
  m.def("attention_weights", &attention_weights, "-> probabilities fp32 (B, H, Lq, Lk)", py::arg("query"),
        py::arg("key"), py::arg("stats"), py::arg("attn_mask"), py::arg("is_causal"), py::arg("scale"),
        py::arg("softcap") = 0.0, py::arg("window_left") = -1, py::arg("window_right") = -1);
  m.def("varlen_forward", &varlen_forward,
        "packed sequences -> (out (total_q, H, D), stats fp32 (2, H, total_q)); the window aligns bottom-right; "
        "seqused_k: a KV cache's used keys per sequence; block_table: a paged cache's pages per sequence (key and "
        "value then pools (pages, page size, Hkv, D); cu_seq_k unread); num_splits: decoding's key splits (0: the "
        "kernels choose, 1: never split)",
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("cu_seq_q"), py::arg("cu_seq_k"),
        py::arg("max_q"), py::arg("max_k"), py::arg("scale"), py::arg("softcap") = 0.0, py::arg("window_left") = -1,
        py::arg("window_right") = -1, py::arg("seqused_k") = py::none(), py::arg("block_table") = py::none(),
        py::arg("num_splits") = 0);
  m.def("varlen_backward", &varlen_backward, "packed sequences -> (dq, dk, dv)", py::arg("dout"), py::arg("query"),
        py::arg("key"), py::arg("value"), py::arg("out"), py::arg("stats"), py::arg("cu_seq_q"), py::arg("cu_seq_k"),
        py::arg("max_q"), py::arg("max_k"), py::arg("scale"), py::arg("softcap") = 0.0, py::arg("window_left") = -1,
        py::arg("window_right") = -1);
  py::tuple head_dims(std::size(fa::kHeadDims));
  for (size_t i = 0; i < std::size(fa::kHeadDims); ++i) head_dims[i] = fa::kHeadDims[i];
  m.attr("head_dims") = head_dims;
}
