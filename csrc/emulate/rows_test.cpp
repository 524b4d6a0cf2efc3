// csrc/rows' launchers (softmax, LayerNorm, RMSNorm; forward and backward) under the CPU emulation of emu.h,
// against double-precision references: every path (one block per row in registers, the multi-block softmax and
// the chunked norms, the fused norm backward with blocks that walk several rows, the two-pass one) in fp32,
// fp16 and bf16. Prints each failure and exits 1 if any. Built and run by tests/test_cuda_emulated.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "emu.h"
#include "rows/rows.h"

static std::mt19937 rng(1234);
static int failures = 0, checks = 0;

template <class T> float tof(T v);
template <> float tof(float v) { return v; }
template <> float tof(__half v) { return __half2float(v); }
template <> float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> T fromf(float v);
template <> float fromf(float v) { return v; }
template <> __half fromf(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 fromf(float v) { return __float2bfloat16_rn(v); }
template <class T> fa::DType dt();
template <> fa::DType dt<float>() { return fa::DType::kFloat32; }
template <> fa::DType dt<__half>() { return fa::DType::kFloat16; }
template <> fa::DType dt<__nv_bfloat16>() { return fa::DType::kBFloat16; }
template <class T> double tol();
template <> double tol<float>() { return 2e-5; }
template <> double tol<__half>() { return 4e-3; }
template <> double tol<__nv_bfloat16>() { return 3e-2; }

template <class T> std::vector<T> randv(size_t n, float scale, float shift = 0.f) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<T> v(n);
  for (auto& e : v) e = fromf<T>(d(rng) * scale + shift);
  return v;
}

void expect(const std::string& what, double err, double bound) {
  ++checks;
  if (!(err <= bound)) { ++failures; std::printf("FAIL %s: max error %.3g > %.3g\n", what.c_str(), err, bound); }
}

// The larger error, infinite for a NaN (which std::max would pass over: a NaN output would not fail).
double worse(double e, double d) { return std::isnan(d) ? INFINITY : std::max(e, d); }

template <class T> std::string dtype_name() {
  return sizeof(T) == 4 ? "fp32" : dt<T>() == fa::DType::kFloat16 ? "fp16" : "bf16";
}

template <class T>
void softmax(const std::vector<T>& x, const std::vector<T>& dy, std::vector<T>& y, std::vector<T>& dx, int rows,
             int cols, const std::string& tag, double t) {
  fa::SoftmaxParams sp{dt<T>(), rows, cols, x.data(), nullptr, y.data(), nullptr};
  std::vector<float> ws(fa::softmax_workspace_floats(sp) + 1);
  sp.workspace = ws.data();
  fa::softmax_forward(sp, nullptr);
  double err = 0;
  for (int r = 0; r < rows; ++r) {
    double m = -INFINITY, s = 0;
    for (int c = 0; c < cols; ++c) m = std::max(m, (double)tof(x[r * (size_t)cols + c]));
    for (int c = 0; c < cols; ++c) s += std::exp(tof(x[r * (size_t)cols + c]) - m);
    for (int c = 0; c < cols; ++c)
      err = worse(err, std::abs(std::exp(tof(x[r * (size_t)cols + c]) - m) / s - tof(y[r * (size_t)cols + c])));
  }
  expect("softmax fwd " + tag, err, t);
  fa::SoftmaxParams bp{dt<T>(), rows, cols, y.data(), dy.data(), dx.data(), nullptr};
  std::vector<float> wsb(fa::softmax_workspace_floats(bp) + 1);
  bp.workspace = wsb.data();
  fa::softmax_backward(bp, nullptr);
  err = 0;
  for (int r = 0; r < rows; ++r) {
    double dot = 0;
    for (int c = 0; c < cols; ++c) dot += (double)tof(y[r * (size_t)cols + c]) * tof(dy[r * (size_t)cols + c]);
    for (int c = 0; c < cols; ++c) {
      const size_t i = r * (size_t)cols + c;
      err = worse(err, std::abs(tof(y[i]) * (tof(dy[i]) - dot) - tof(dx[i])));
    }
  }
  expect("softmax bwd " + tag, err, t * 4);
}

template <class T, class PT>
void norms(const std::vector<T>& x, const std::vector<T>& dy, const std::vector<PT>& w, const std::vector<PT>& b,
           std::vector<T>& dx, int rows, int cols, const std::string& tag, double t) {
  const size_t n = static_cast<size_t>(rows) * cols;
  for (int rms = 0; rms < 2; ++rms) {
    for (int affine = 0; affine < 2; ++affine) {
      const std::string name = std::string(rms ? "rms_norm " : "layer_norm ") + (affine ? "w " : "- ") + tag;
      std::vector<float> mean(rows), rstd(rows);
      std::vector<PT> dw(cols, fromf<PT>(NAN)), db(cols, fromf<PT>(NAN));
      std::vector<T> out(n);
      fa::NormParams p{};
      p.dtype = dt<T>(); p.param_dtype = dt<PT>(); p.rows = rows; p.cols = cols; p.rms = rms; p.eps = 1e-5f;
      p.x = x.data(); p.weight = affine ? w.data() : nullptr; p.bias = affine && !rms ? b.data() : nullptr;
      p.out = out.data(); p.mean = rms ? nullptr : mean.data(); p.rstd = rstd.data();
      fa::norm_forward(p, nullptr);
      double ey = 0, es = 0;
      std::vector<double> dmean(rows), drstd(rows);
      for (int r = 0; r < rows; ++r) {
        double mu = 0, var = 0;
        for (int c = 0; c < cols; ++c) mu += tof(x[r * (size_t)cols + c]);
        mu = rms ? 0 : mu / cols;
        for (int c = 0; c < cols; ++c) var += std::pow(tof(x[r * (size_t)cols + c]) - mu, 2);
        const double rs = 1 / std::sqrt(var / cols + 1e-5);
        dmean[r] = mu; drstd[r] = rs;
        es = worse(es, std::abs(rs - rstd[r]) / rs + (rms ? 0 : std::abs(mu - mean[r])));
        for (int c = 0; c < cols; ++c) {
          const double want = (tof(x[r * (size_t)cols + c]) - mu) * rs * (affine ? tof(w[c]) : 1) +
                               (affine && !rms ? tof(b[c]) : 0);
          ey = worse(ey, std::abs(want - tof(out[r * (size_t)cols + c])) / (1 + std::abs(want)));
        }
      }
      expect(name + " fwd y", ey, t * 2);
      expect(name + " fwd stats", es, 1e-5);
      // backward from our statistics
      p.dy = dy.data(); p.out = dx.data();
      p.dweight = affine ? dw.data() : nullptr; p.dbias = affine && !rms ? db.data() : nullptr;
      std::vector<float> wsn(fa::norm_workspace_floats(p) + 1, NAN);
      p.workspace = wsn.data();
      fa::norm_backward(p, nullptr);
      double edx = 0, edw = 0, edb = 0;
      std::vector<double> rdw(cols, 0), rdb(cols, 0);
      for (int r = 0; r < rows; ++r) {
        const double mu = rms ? 0 : mean[r], rs = rstd[r];
        double sg = 0, sgx = 0;
        for (int c = 0; c < cols; ++c) {
          const size_t i = r * (size_t)cols + c;
          const double xh = (tof(x[i]) - mu) * rs, g = tof(dy[i]) * (affine ? tof(w[c]) : 1);
          sg += g; sgx += g * xh;
          rdw[c] += tof(dy[i]) * xh; rdb[c] += tof(dy[i]);
        }
        const double mg = rms ? 0 : sg / cols, mgx = sgx / cols;
        for (int c = 0; c < cols; ++c) {
          const size_t i = r * (size_t)cols + c;
          const double xh = (tof(x[i]) - mu) * rs, g = tof(dy[i]) * (affine ? tof(w[c]) : 1);
          const double want = rs * (g - mg - xh * mgx);
          edx = worse(edx, std::abs(want - tof(dx[i])) / (1 + std::abs(want)));
        }
      }
      expect(name + " bwd dx", edx, t * 4);
      if (affine) {
        for (int c = 0; c < cols; ++c) {
          edw = worse(edw, std::abs(rdw[c] - tof(dw[c])) / (1 + std::abs(rdw[c])));
          if (!rms) edb = worse(edb, std::abs(rdb[c] - tof(db[c])) / (1 + std::abs(rdb[c])));
        }
        // fp32 sums, rounded once to PT
        const double bound = std::max(1e-4, tol<PT>() / 4);
        expect(name + " bwd dweight", edw, bound);
        if (!rms) expect(name + " bwd dbias", edb, bound);
      }
    }
  }
}

// The row ops on (rows, cols) of T; the norms' weight, bias and their gradients in PT (float32, or T itself).
template <class T, class PT = float> void run(int rows, int cols) {
  const std::string tag = dtype_name<T>() + " " + std::to_string(rows) + "x" + std::to_string(cols) +
                          (std::is_same_v<PT, float> ? "" : " params " + dtype_name<PT>());
  const size_t n = static_cast<size_t>(rows) * cols;
  auto x = randv<T>(n, 2.f, 0.5f), dy = randv<T>(n, 1.f);
  auto w = randv<PT>(cols, 1.f), b = randv<PT>(cols, 1.f);
  const double t = tol<T>();
  std::vector<T> y(n), dx(n);
  if constexpr (std::is_same_v<PT, float>) softmax(x, dy, y, dx, rows, cols, tag, t);
  norms(x, dy, w, b, dx, rows, cols, tag, t);
}

int main() {
  // (rows, cols): odd widths (scalar edges), whole vectors (the fused backward; with emu's 3 SMs x 2 blocks its
  // grid has 6 blocks, so 9 and 20 rows make blocks walk several rows), and the 16K cap and past it.
  const std::array<std::array<int, 2>, 12> shapes = {{{1, 1}, {3, 8}, {5, 37}, {7, 64}, {13, 1000}, {4, 1024},
                                                      {9, 1024}, {20, 256}, {3, 4099}, {2, 8192}, {2, 16384},
                                                      {2, 20000}}};
  for (auto& s : shapes) {
    run<float>(s[0], s[1]);
    run<__half>(s[0], s[1]);
    run<__nv_bfloat16>(s[0], s[1]);
    run<__half, __half>(s[0], s[1]);  // a model's own parameters: read in the rows' dtype
    run<__nv_bfloat16, __nv_bfloat16>(s[0], s[1]);
    std::printf("%dx%d done (%d checks, %d failed)\n", s[0], s[1], checks, failures);
    std::fflush(stdout);
  }
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures != 0;
}
