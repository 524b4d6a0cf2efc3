// csrc/attention's launchers (forward, backward, and the probabilities for need_weights) under the CPU emulation of
// emu.h and ptx.h, against a float64 reference: every head dim, fp16 and bf16, causal with Lq != Lk, GQA, boolean
// masks with a fully masked row, additive masks, lengths that leave partial tiles, dropout (the reference drops what
// dropout_keep decides; dropout_test.cpp checks those decisions against Triton's), local windows and the logit cap.
// Prints each failure and exits 1 if any. Built and run by tests/test_cuda_emulated.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "attention/flash.h"
#include "attention/primitives.cuh"
#include "emu.h"

static std::mt19937 rng(4321);
static int failures = 0, checks = 0;

template <class T> float tof(T v);
template <> float tof(__half v) { return __half2float(v); }
template <> float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> float finfo_min();
template <> float finfo_min<__half>() { return -65504.f; }
template <> float finfo_min<__nv_bfloat16>() { return -3.3895313892515355e38f; }
template <class T> T fromf(float v);
template <> __half fromf(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 fromf(float v) { return __float2bfloat16_rn(v); }

// kFinfoMin: kAdditive with the last query row of head 0 masked with the dtype's finfo.min at every key (Hugging
// Face's padding). For bf16 (finfo.min ~ -3.4e38) the scores clamp to -FLT_MAX, where max + log sum cannot resolve
// the log sum: the forward, the decoding merge, the weights (1 / Lk) and the gradients through that row must still
// be torch's, from the row max and log sum kept apart.
enum Mask { kNone, kBool, kAdditive, kFinfoMin };

struct Case {
  int B, H, Hkv, Lq, Lk, D;
  bool causal;
  Mask mask;
  float dropout = 0.f;
  float softcap = 0.f;              // the logit cap c: scores c * tanh(s / c); 0: none
  int window_left = -1, window_right = -1;  // query i sees keys i - left .. i + right; -1: unbounded
};

void expect(const std::string& what, double err, double bound) {
  ++checks;
  if (!(err <= bound)) {
    ++failures;
    std::printf("FAIL %s: error %.3g > %.3g\n", what.c_str(), err, bound);
  }
}

// The larger error, infinite for a NaN (which std::max would pass over: a NaN output would not fail).
double worse(double e, double d) { return std::isnan(d) ? INFINITY : std::max(e, d); }

// max |a - b| / max(1, max |b|)
double rel_err(const std::vector<double>& ref, const std::vector<float>& got) {
  double e = 0, m = 1;
  for (size_t i = 0; i < ref.size(); ++i) {
    e = worse(e, std::abs(ref[i] - got[i]));
    m = std::max(m, std::abs(ref[i]));
  }
  return e / m;
}

template <class T>
std::vector<T> random_normal(size_t n) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> v(n);
  for (auto& e : v) e = fromf<T>(nd(rng));
  return v;
}

template <class T>
std::vector<float> floats(const std::vector<T>& t) {
  std::vector<float> f(t.size());
  for (size_t i = 0; i < t.size(); ++i) f[i] = tof(t[i]);
  return f;
}

// A query row's probabilities, dS (the softmax's gradient times the cap's slope) and logsumexp (-inf for no key).
struct RowReference {
  std::vector<double> p, ds;
  double lse;
};

// One query row of attention in float64, from the (rounded) inputs: the scores scale * q.k against Lk keys, capped
// (softcap: c * tanh(s / c)), then masked(j, s) (-inf hides key j, an additive mask adds to s); the softmax (zeros
// for a row that sees no key) and drop[j] (dropout's 0 or 1 / (1 - p); empty: none). Adds the row's output to
// out[0 .. D) and its backward (dO = dout) to dq[0 .. D), key_grad(j) and value_grad(j) (the dK and dV rows).

template <class T, class Masked, class Key, class Value, class KeyGrad, class ValueGrad>
RowReference reference_row(const T* q, const T* dout, Key key, Value value, int Lk, int D, double scale,
                           double softcap, Masked masked, const std::vector<double>& drop, double* out, double* dq,
                           KeyGrad key_grad, ValueGrad value_grad) {
  RowReference r{std::vector<double>(Lk, 0.0), std::vector<double>(Lk), -INFINITY};
  std::vector<double> s(Lk), dp(Lk), slope(Lk, 1.0);
  const auto dropped = [&](int j) { return drop.empty() ? 1.0 : drop[j]; };
  double m = -INFINITY;
  for (int j = 0; j < Lk; ++j) {
    const T* k = key(j);
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += (double)tof(q[d]) * tof(k[d]);
    s[j] = dot * scale;
    if (softcap > 0) {  // capped before the masks; dS takes the slope 1 - tanh^2
      const double t = std::tanh(s[j] / softcap);
      s[j] = softcap * t;
      slope[j] = 1 - t * t;
    }
    masked(j, s[j]);
    m = std::max(m, s[j]);
  }
  double sum = 0;
  if (m != -INFINITY)
    for (int j = 0; j < Lk; ++j) sum += (r.p[j] = std::exp(s[j] - m));
  for (int j = 0; j < Lk; ++j) r.p[j] = sum > 0 ? r.p[j] / sum : 0.0;
  if (sum > 0) r.lse = m + std::log(sum);
  double rowdot = 0;  // rowsum(dP * P), dP dropped
  for (int j = 0; j < Lk; ++j) {
    const T* v = value(j);
    dp[j] = 0;
    for (int d = 0; d < D; ++d) {
      out[d] += r.p[j] * dropped(j) * tof(v[d]);
      dp[j] += (double)tof(dout[d]) * tof(v[d]);
    }
    dp[j] *= dropped(j);
    rowdot += dp[j] * r.p[j];
  }
  for (int j = 0; j < Lk; ++j) {
    r.ds[j] = r.p[j] * (dp[j] - rowdot) * slope[j];
    const T* k = key(j);
    double *dk = key_grad(j), *dv = value_grad(j);
    for (int d = 0; d < D; ++d) {
      dq[d] += scale * r.ds[j] * tof(k[d]);
      dk[d] += scale * r.ds[j] * tof(q[d]);
      dv[d] += r.p[j] * dropped(j) * tof(dout[d]);
    }
  }
  return r;
}

// Params of contiguous (B, H, L, D) q, out and (B, Hkv, Lk, D) k, v with a dense (B, H, Lq, Lk) mask, of the
// dtype named "bf16" or "fp16", without a causal mask or dropout.
template <class T>
fa::AttentionParams dense_params(const char* dtype, int B, int H, int Hkv, int Lq, int Lk, int D, const T* q,
                                 const T* k, const T* v, fa::MaskKind mask_kind, const void* mask, T* out,
                                 float* stats) {
  fa::AttentionParams p{};
  p.dtype = std::string(dtype) == "bf16" ? fa::DType::kBFloat16 : fa::DType::kFloat16;
  p.batch = B, p.heads = H, p.kv_heads = Hkv, p.q_len = Lq, p.k_len = Lk, p.head_dim = D;
  p.scale = 1.f / std::sqrt((float)D);
  p.q = q, p.k = k, p.v = v;
  p.q_batch_stride = (int64_t)H * Lq * D, p.q_head_stride = (int64_t)Lq * D, p.q_row_stride = D;
  p.k_batch_stride = (int64_t)Hkv * Lk * D, p.k_head_stride = (int64_t)Lk * D, p.k_row_stride = D;
  p.v_batch_stride = p.k_batch_stride, p.v_head_stride = p.k_head_stride, p.v_row_stride = D;
  p.mask_kind = mask_kind, p.mask = mask;
  p.mask_batch_stride = (int64_t)H * Lq * Lk, p.mask_head_stride = (int64_t)Lq * Lk, p.mask_q_stride = Lk;
  p.mask_k_stride = 1;
  p.out = out;
  p.row_max = stats, p.row_log_sum = stats + (int64_t)B * H * Lq;  // (2, B, H, Lq)
  p.o_batch_stride = p.q_batch_stride, p.o_head_stride = p.q_head_stride, p.o_row_stride = D;
  return p;
}

template <class T>
void run(const Case& c, const char* dtype, double tol) {
  const int B = c.B, H = c.H, Hkv = c.Hkv, Lq = c.Lq, Lk = c.Lk, D = c.D, G = H / Hkv;
  const bool window = c.window_left >= 0 || c.window_right >= 0;
  const std::string tag = std::string(dtype) + " D" + std::to_string(D) + " B" + std::to_string(B) + " H" +
                          std::to_string(H) + "/" + std::to_string(Hkv) + " Lq" + std::to_string(Lq) + " Lk" +
                          std::to_string(Lk) + (c.causal ? " causal" : "") +
                          (c.mask == kBool ? " bool" : c.mask == kAdditive ? " additive"
                                                       : c.mask == kFinfoMin ? " finfo.min row" : "") +
                          (c.dropout > 0 ? " dropout " + std::to_string(c.dropout) : "") +
                          (c.softcap > 0 ? " softcap " + std::to_string(c.softcap) : "") +
                          (window ? " window (" + std::to_string(c.window_left) + ", " +
                                        std::to_string(c.window_right) + ")" : "");
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> q = random_normal<T>((size_t)B * H * Lq * D), k = random_normal<T>((size_t)B * Hkv * Lk * D),
                 v = random_normal<T>((size_t)B * Hkv * Lk * D), dout = random_normal<T>((size_t)B * H * Lq * D);
  // masks, (B, H, Lq, Lk) dense: bool keys padded per batch (row 0 of head 0 fully masked); additive random
  // on a ramp over the keys, so that the forward's running max grows tile after tile and rescales O
  std::vector<uint8_t> keep((size_t)B * H * Lq * Lk, 1);
  std::vector<T> add((size_t)B * H * Lq * Lk, fromf<T>(0.f));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < Lq; ++i)
        for (int j = 0; j < Lk; ++j) {
          const size_t at = (((size_t)b * H + h) * Lq + i) * Lk + j;
          keep[at] = !(j >= Lk - 5 - b) && !(h == 0 && i == 0);
          add[at] = fromf<T>(nd(rng) + 0.3f * j);  // a ramp: each key tile's max passes the last one's
          if (c.mask == kFinfoMin && h == 0 && i == Lq - 1) add[at] = fromf<T>(finfo_min<T>());
        }
  std::vector<T> out((size_t)B * H * Lq * D), dq(q.size()), dk(k.size()), dv(v.size());
  const size_t rows = (size_t)B * H * Lq;
  std::vector<float> stats(2 * rows), delta(rows);
  const fa::MaskKind kind = c.mask == kBool ? fa::MaskKind::kBool : c.mask == kNone ? fa::MaskKind::kNone
                                                                                     : fa::MaskKind::kAdditive;
  const void* mask = c.mask == kBool ? (const void*)keep.data() : (const void*)add.data();
  fa::AttentionParams p =
      dense_params(dtype, B, H, Hkv, Lq, Lk, D, q.data(), k.data(), v.data(), kind, mask, out.data(), stats.data());
  const float scale = p.scale;
  p.causal = c.causal;
  p.dropout_p = c.dropout;
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - c.dropout));
  p.seed = 0x9E3779B97F4A7C15ull >> 1;  // both words of the Philox key in play
  p.softcap = c.softcap;
  p.window = window;
  p.window_left = c.window_left < 0 ? fa::kNoWindow : c.window_left;
  p.window_right = c.window_right < 0 ? fa::kNoWindow : c.window_right;
  std::vector<float> workspace(fa::attention_forward_workspace_floats(p));  // decoding's split parts
  p.split_out = workspace.data();
  const fa::DecodePlan plan = fa::decode_plan(p);
  if (c.Lq <= 16 && c.Lk >= 1024 && !c.causal)  // with dropout or a window the tiled forward runs it
    expect(tag + " takes the split-KV path", (plan.splits > 1) == (c.dropout == 0 && !window) ? 0 : 1, 0);
  if (int err = fa::attention_forward(p, nullptr)) {
    expect(tag + " forward launch error " + std::to_string(err), 1, 0);
    return;
  }
  std::vector<float> weights((size_t)B * H * Lq * Lk);
  p.weights = weights.data();
  if (int err = fa::attention_weights(p, nullptr)) {
    expect(tag + " weights launch error " + std::to_string(err), 1, 0);
    return;
  }
  p.dout = dout.data();
  p.do_batch_stride = p.q_batch_stride, p.do_head_stride = p.q_head_stride, p.do_row_stride = D;
  p.delta = delta.data();
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  p.dq_batch_stride = p.q_batch_stride, p.dq_head_stride = p.q_head_stride, p.dq_row_stride = D;
  p.dkv_batch_stride = p.k_batch_stride, p.dkv_head_stride = p.k_head_stride, p.dkv_row_stride = D;
  // an additive mask's gradient (dS), as for a learned bias; the kernels give none under the cap
  const bool mask_grad = kind == fa::MaskKind::kAdditive && c.softcap == 0;
  std::vector<float> dmask(mask_grad ? (size_t)B * H * Lq * Lk : 0, 0.f);
  p.dmask = mask_grad ? dmask.data() : nullptr;
  if (int err = fa::attention_backward(p, nullptr)) {
    expect(tag + " backward launch error " + std::to_string(err), 1, 0);
    return;
  }

  // float64 reference from the same (rounded) inputs
  std::vector<double> ro(out.size(), 0), rdq(q.size(), 0), rdk(k.size(), 0), rdv(v.size(), 0), rlse(rows);
  std::vector<double> rdmask(dmask.size());
  std::vector<double> rweights(weights.size());
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const size_t kv = ((size_t)b * Hkv + h / G) * Lk;  // the first key row of this head's kv head
      const auto K = [&](int j) { return &k[(kv + j) * D]; };
      const auto V = [&](int j) { return &v[(kv + j) * D]; };
      const auto dK = [&](int j) { return &rdk[(kv + j) * D]; };
      const auto dV = [&](int j) { return &rdv[(kv + j) * D]; };
      for (int i = 0; i < Lq; ++i) {
        const size_t row = ((size_t)b * H + h) * Lq + i;
        const auto masked = [&](int j, double& s) {
          if (c.causal && j > i) s = -INFINITY;
          if ((c.window_left >= 0 && j < i - c.window_left) || (c.window_right >= 0 && j > i + c.window_right))
            s = -INFINITY;
          if (c.mask == kBool && !keep[row * Lk + j]) s = -INFINITY;
          if (c.mask == kAdditive || c.mask == kFinfoMin) s += tof(add[row * Lk + j]);
        };
        // dropout after the softmax: the kept probabilities scaled by 1 / (1 - p), the others 0
        std::vector<double> drop;
        for (int j = 0; j < Lk && c.dropout > 0; ++j)
          drop.push_back(fa::dropout_keep(p, b, h, i, j) ? 1.0 / (1.0 - c.dropout) : 0.0);
        const RowReference r = reference_row(&q[row * D], &dout[row * D], K, V, Lk, D, scale, c.softcap, masked,
                                             drop, &ro[row * D], &rdq[row * D], dK, dV);
        std::copy(r.p.begin(), r.p.end(), rweights.begin() + row * Lk);
        if (mask_grad) std::copy(r.ds.begin(), r.ds.end(), rdmask.begin() + row * Lk);
        rlse[row] = r.lse;
      }
    }
  expect(tag + " out", rel_err(ro, floats(out)), tol);
  if (c.mask == kFinfoMin)
    for (int b = 0; b < B; ++b) {
      const size_t row = ((size_t)b * H) * Lq + Lq - 1;
      // The uniform average is small (about 1 / sqrt(Lk)): measured against itself, not against 1 as above.
      double e = 0, m = 0;
      for (int d = 0; d < D; ++d) {
        e = worse(e, std::abs(ro[row * D + d] - tof(out[row * D + d])));
        m = std::max(m, std::abs(ro[row * D + d]));
      }
      expect(tag + " out of that row", e / m, tol);
      if (finfo_min<T>() < -1e38f) {  // bf16: scores and max -FLT_MAX, the log sum log2(Lk); no lse to compare
        expect(tag + " max of that row", std::abs(stats[row] + FLT_MAX), 0);
        expect(tag + " log sum of that row", std::abs(stats[rows + row] - std::log2((double)Lk)), 1e-5);
        rlse[row] = NAN;
      }
    }
  double el = 0;  // the logsumexp, (max + log sum) ln 2, against the reference's
  for (size_t i = 0; i < rows; ++i) {
    const double lse = ((double)stats[i] + stats[rows + i]) * std::log(2.0);
    if (!std::isnan(rlse[i]))
      el = std::max(el, std::isinf(rlse[i]) ? (lse == rlse[i] ? 0.0 : INFINITY) : std::abs(rlse[i] - lse));
  }
  expect(tag + " lse", el, 2e-2);
  expect(tag + " weights", rel_err(rweights, weights), 1e-3);  // fp32 from the saved statistics
  expect(tag + " dq", rel_err(rdq, floats(dq)), 4 * tol);
  expect(tag + " dk", rel_err(rdk, floats(dk)), 4 * tol);
  expect(tag + " dv", rel_err(rdv, floats(dv)), 4 * tol);
  if (mask_grad) {  // dS is small (P times dP): measured against its own largest value
    double e = 0, m = 0;
    for (size_t i = 0; i < rdmask.size(); ++i) {
      e = worse(e, std::abs(rdmask[i] - dmask[i]));
      m = std::max(m, std::abs(rdmask[i]));
    }
    expect(tag + " dmask", e / m, tol);
  }
}

// A NaN in an additive mask makes its row NaN, as in torch: in decoding too, where the split that meets it must not
// be merged away as a split without keys. Head 0's query meets the NaN (key 700, in a later split); head 1's not.
template <class T>
void nan_row_in_decoding(const char* dtype) {
  const int H = 2, Lk = 1100, D = 64;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> q((size_t)H * D), k((size_t)Lk * D), v((size_t)Lk * D), add((size_t)H * Lk, fromf<T>(0.f));
  for (auto* t : {&q, &k, &v})
    for (auto& e : *t) e = fromf<T>(nd(rng));
  add[700] = fromf<T>(NAN);
  std::vector<T> out((size_t)H * D);
  std::vector<float> stats(2 * H);
  fa::AttentionParams p = dense_params(dtype, 1, H, 1, 1, Lk, D, q.data(), k.data(), v.data(),
                                       fa::MaskKind::kAdditive, add.data(), out.data(), stats.data());
  std::vector<float> workspace(fa::attention_forward_workspace_floats(p));
  p.split_out = workspace.data();
  const std::string tag = std::string(dtype) + " decoding, a NaN in the mask";
  expect(tag + " takes the split-KV path", fa::decode_plan(p).splits > 1 ? 0 : 1, 0);
  if (int err = fa::attention_forward(p, nullptr)) {
    expect(tag + " forward launch error " + std::to_string(err), 1, 0);
    return;
  }
  int nan0 = 0, nan1 = 0;
  for (int d = 0; d < D; ++d) nan0 += std::isnan(tof(out[d])), nan1 += std::isnan(tof(out[D + d]));
  expect(tag + ": its row's outputs that are not NaN", D - nan0, 0);
  expect(tag + ": NaN outputs in the other head's row", nan1, 0);
}

// Packed sequences (flash.h: cu_seq_q): q (total_q, H, D), k and v (total_k, Hkv, D), sequence b at rows
// cu_seq_q[b] .. and cu_seq_k[b] ..; the window aligns bottom-right in each sequence. The outputs start as NaN, so
// a row no block writes fails. With used_k (a KV cache's seqused_k) sequence b attends to its first used_k[b] keys
// only, the rest of its rows NaN (a row read fails); forward only, as in torch. With page_size too, the cache is
// paged (flash.h: block_table): each sequence's slot cut into pages, the pages shuffled into pools among unused
// pages of NaN, K's pages one row apart and V's two (page strides other than page_size rows), the table's entries
// past a sequence's pages an unused page's; cu_seq_k keeps the packed offsets, which the kernels must not read.
// Decoding shapes (the longest sequence's queries at most kDecodeMaxQ, its keys at least kDecodeMinKeys) take the
// split-KV kernel unless num_splits is 1 (AttentionParams::num_splits).
struct VarlenCase {
  int H, Hkv, D;
  std::vector<int> lengths_q, lengths_k;
  float softcap = 0.f;
  int window_left = -1, window_right = -1;  // query i of Lq sees keys i + Lk - Lq - left .. i + Lk - Lq + right
  std::vector<int> used_k = {};
  int page_size = 0;
  int num_splits = 0;
};

// The pools and block table of a paged cache holding the packed k and v (VarlenCase::page_size) in p.
template <class T>
struct PagedCache {
  std::vector<T> k, v;
  std::vector<int> table;

  PagedCache(fa::AttentionParams& p, const std::vector<T>& k_rows, const std::vector<T>& v_rows,
             const std::vector<int>& cu_k, int page_size) {
    const int B = static_cast<int>(cu_k.size()) - 1;
    const int64_t row = (int64_t)p.kv_heads * p.head_dim;
    const int64_t k_page = (page_size + 1) * row, v_page = (page_size + 2) * row;
    int per_seq = 0, pages = 3;  // 3 never used
    for (int b = 0; b < B; ++b) {
      const int n = (cu_k[b + 1] - cu_k[b] + page_size - 1) / page_size;
      per_seq = std::max(per_seq, n), pages += n;
    }
    std::vector<int> order(pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    k.assign(pages * k_page, fromf<T>(NAN)), v.assign(pages * v_page, fromf<T>(NAN));
    table.assign((size_t)B * std::max(per_seq, 1), order.back());
    int next = 0;
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < cu_k[b + 1] - cu_k[b]; ++j) {
        if (j % page_size == 0) table[(size_t)b * per_seq + j / page_size] = order[next++];
        const int64_t page = table[(size_t)b * per_seq + j / page_size], at = (int64_t)(cu_k[b] + j) * row;
        std::copy_n(&k_rows[at], row, &k[page * k_page + (j % page_size) * row]);
        std::copy_n(&v_rows[at], row, &v[page * v_page + (j % page_size) * row]);
      }
    p.k = k.data(), p.v = v.data();
    p.k_row_stride = p.v_row_stride = row;  // the head strides stay D
    p.k_page_stride = k_page, p.v_page_stride = v_page, p.page_size = page_size;
    p.block_table = table.data(), p.block_table_stride = per_seq;
  }
};

template <class T>
void run_varlen(const VarlenCase& c, const char* dtype, double tol) {
  const int H = c.H, Hkv = c.Hkv, D = c.D, G = H / Hkv, B = static_cast<int>(c.lengths_q.size());
  std::vector<int> cu_q{0}, cu_k{0};
  for (int b = 0; b < B; ++b)
    cu_q.push_back(cu_q.back() + c.lengths_q[b]), cu_k.push_back(cu_k.back() + c.lengths_k[b]);
  const int total_q = cu_q.back(), total_k = cu_k.back();
  const int max_q = *std::max_element(c.lengths_q.begin(), c.lengths_q.end());
  const int max_k = *std::max_element(c.lengths_k.begin(), c.lengths_k.end());
  std::string tag = std::string(dtype) + " varlen D" + std::to_string(D) + " H" + std::to_string(H) + "/" +
                    std::to_string(Hkv) + " lengths";
  for (int b = 0; b < B; ++b) tag += " " + std::to_string(c.lengths_q[b]) + "x" + std::to_string(c.lengths_k[b]);
  if (c.softcap > 0) tag += " softcap " + std::to_string(c.softcap);
  if (c.window_left >= 0 || c.window_right >= 0)
    tag += " window (" + std::to_string(c.window_left) + ", " + std::to_string(c.window_right) + ")";
  const bool cache = !c.used_k.empty();
  std::vector<int> used_k = cache ? c.used_k : c.lengths_k;  // the keys each sequence attends to
  if (cache) {
    tag += " used keys";
    for (int u : used_k) tag += " " + std::to_string(u);
  }
  if (c.page_size > 0) tag += " in pages of " + std::to_string(c.page_size);
  if (c.num_splits > 0) tag += " num_splits " + std::to_string(c.num_splits);
  std::vector<T> q = random_normal<T>((size_t)total_q * H * D), k = random_normal<T>((size_t)total_k * Hkv * D),
                 v = random_normal<T>((size_t)total_k * Hkv * D), dout = random_normal<T>((size_t)total_q * H * D);
  for (int b = 0; b < B; ++b)  // a cache's rows past the used keys: never to be read
    for (size_t r = (size_t)cu_k[b] + used_k[b]; r < (size_t)cu_k[b + 1]; ++r)
      for (size_t e = 0; e < (size_t)Hkv * D; ++e) k[r * Hkv * D + e] = v[r * Hkv * D + e] = fromf<T>(NAN);
  std::vector<T> out(q.size(), fromf<T>(NAN)), dq(q.size(), fromf<T>(NAN)), dk(k.size(), fromf<T>(NAN)),
      dv(v.size(), fromf<T>(NAN));
  std::vector<float> stats(2 * (size_t)H * total_q, NAN), delta((size_t)H * total_q);

  fa::AttentionParams p{};
  p.dtype = std::string(dtype) == "bf16" ? fa::DType::kBFloat16 : fa::DType::kFloat16;
  p.batch = B, p.heads = H, p.kv_heads = Hkv, p.q_len = max_q, p.k_len = max_k, p.head_dim = D, p.total_q = total_q;
  p.scale = 1.f / std::sqrt((float)D);
  p.cu_seq_q = cu_q.data(), p.cu_seq_k = cu_k.data();
  if (cache) p.seqused_k = used_k.data();
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.dout = dout.data();
  p.q_head_stride = p.o_head_stride = p.do_head_stride = p.dq_head_stride = D;  // batch strides 0
  p.q_row_stride = p.o_row_stride = p.do_row_stride = p.dq_row_stride = (int64_t)H * D;
  p.k_head_stride = p.v_head_stride = p.dkv_head_stride = D;
  p.k_row_stride = p.v_row_stride = p.dkv_row_stride = (int64_t)Hkv * D;
  p.row_max = stats.data(), p.row_log_sum = stats.data() + (size_t)H * total_q;  // (2, H, total_q)
  p.softcap = c.softcap;
  p.window = c.window_left >= 0 || c.window_right >= 0;
  p.window_left = c.window_left < 0 ? fa::kNoWindow : c.window_left;
  p.window_right = c.window_right < 0 ? fa::kNoWindow : c.window_right;
  p.num_splits = c.num_splits;
  p.delta = delta.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  std::optional<PagedCache<T>> paged;
  if (c.page_size > 0) paged.emplace(p, k, v, cu_k, c.page_size);
  const bool decoding = max_q <= 16 && max_k >= 1024 && c.num_splits != 1;  // kDecodeMaxQ, kDecodeMinKeys
  const fa::DecodePlan plan = fa::decode_plan(p);
  expect(tag + (decoding ? " takes the split-KV kernel" : " runs tiled"), (plan.splits > 0) == decoding ? 0 : 1, 0);
  if (c.num_splits > 1)  // n ways, or fewer where n tiles would leave some empty
    expect(tag + " splits at most num_splits ways", plan.splits > 1 && plan.splits <= c.num_splits ? 0 : 1, 0);
  std::vector<float> workspace(fa::attention_forward_workspace_floats(p), NAN);  // decoding's split parts
  expect(tag + " has a workspace for its splits", workspace.empty() == (plan.splits <= 1) ? 0 : 1, 0);
  p.split_out = workspace.data();
  if (int err = fa::attention_forward(p, nullptr)) {
    expect(tag + " forward launch error " + std::to_string(err), 1, 0);
    return;
  }
  if (int err = cache ? 0 : fa::attention_backward(p, nullptr)) {
    expect(tag + " backward launch error " + std::to_string(err), 1, 0);
    return;
  }

  // float64 reference, sequence by sequence
  std::vector<double> ro(out.size(), 0), rdq(q.size(), 0), rdk(k.size(), 0), rdv(v.size(), 0);
  std::vector<double> rlse((size_t)H * total_q, -INFINITY);
  for (int b = 0; b < B; ++b) {
    const int Lq = c.lengths_q[b], Lk = used_k[b], shift = Lk - Lq;
    for (int h = 0; h < H; ++h) {
      const auto at = [&](int j) { return (((size_t)cu_k[b] + j) * Hkv + h / G) * D; };  // key j of the kv head
      const auto K = [&](int j) { return &k[at(j)]; };
      const auto V = [&](int j) { return &v[at(j)]; };
      const auto dK = [&](int j) { return &rdk[at(j)]; };
      const auto dV = [&](int j) { return &rdv[at(j)]; };
      for (int i = 0; i < Lq; ++i) {
        const size_t row = ((size_t)cu_q[b] + i) * H + h;  // (query, head) in q, out, dout
        const auto masked = [&](int j, double& s) {
          if ((c.window_left >= 0 && j < i + shift - c.window_left) ||
              (c.window_right >= 0 && j > i + shift + c.window_right))
            s = -INFINITY;
        };
        rlse[(size_t)h * total_q + cu_q[b] + i] =
            reference_row(&q[row * D], &dout[row * D], K, V, Lk, D, (double)p.scale, c.softcap, masked, {},
                          &ro[row * D], &rdq[row * D], dK, dV).lse;
      }
    }
  }
  expect(tag + " out", rel_err(ro, floats(out)), tol);
  double el = 0;
  for (size_t r = 0; r < rlse.size(); ++r) {
    const double lse = ((double)stats[r] + stats[rlse.size() + r]) * std::log(2.0);
    el = std::max(el, std::isinf(rlse[r]) ? (lse == rlse[r] ? 0.0 : INFINITY) : std::abs(rlse[r] - lse));
  }
  expect(tag + " lse", std::isnan(el) ? INFINITY : el, 2e-2);
  if (cache) return;  // no backward
  expect(tag + " dq", rel_err(rdq, floats(dq)), 4 * tol);
  expect(tag + " dk", rel_err(rdk, floats(dk)), 4 * tol);
  expect(tag + " dv", rel_err(rdv, floats(dv)), 4 * tol);
}

int main() {
  const Case cases[] = {
      {1, 2, 2, 1, 1, 64, false, kNone},      {1, 2, 1, 97, 111, 64, true, kNone},
      {1, 1, 1, 130, 64, 128, false, kNone},  {1, 1, 1, 200, 333, 32, true, kNone},
      {2, 2, 2, 40, 70, 96, false, kBool},    {1, 2, 1, 33, 65, 128, false, kAdditive},
      {1, 1, 1, 150, 150, 96, true, kNone},   {1, 1, 1, 64, 300, 128, false, kNone},
      {1, 1, 1, 300, 260, 64, true, kNone},  // D 64's 64-key steps: interior tiles below the diagonal
      {2, 2, 1, 45, 77, 64, false, kAdditive},  // the dQ kernel's masks by kind (head dims up to 64)
      // a row masked with finfo.min everywhere: tiled, and decoding over splits of unequal key counts
      {1, 2, 1, 33, 65, 64, false, kFinfoMin},  {1, 4, 2, 3, 1100, 64, false, kFinfoMin},
  };
  for (const Case& c : cases) {
    run<__nv_bfloat16>(c, "bf16", 2e-2);
    run<__half>(c, "fp16", 4e-3);
    std::printf("case done (%d checks, %d failed)\n", checks, failures);
    std::fflush(stdout);
  }
  // The rest in one dtype each, bf16 and fp16 in turn (the cases above run both through every kernel; CPU time).
  const Case one_dtype[] = {
      // decoding (decode_kernel.cuh): GQA groups packed into rows, several key splits (the emulated GPU has 3
      // SMs), a partial last tile, a fully masked row, blocks of 2 and 4 warps; causal goes to the tiled forward
      {1, 4, 1, 1, 1024, 128, false, kNone},  {2, 4, 2, 3, 1100, 64, false, kBool},
      {1, 8, 1, 3, 1030, 96, false, kAdditive}, {1, 2, 2, 16, 2048, 32, false, kNone},
      {1, 2, 1, 5, 1024, 64, true, kNone},
      {1, 16, 1, 5, 1024, 32, false, kBool},  // 80 rows: blocks of 4 warps, the second with one working warp
      // dropout: every head dim, GQA, causal, masks; a decoding shape, which then takes the tiled forward
      {1, 2, 1, 70, 90, 64, false, kNone, 0.3f},    {2, 2, 2, 40, 70, 128, true, kNone, 0.2f},
      {1, 2, 2, 33, 65, 32, false, kBool, 0.5f},    {1, 2, 1, 50, 45, 96, false, kAdditive, 0.1f},
      {1, 4, 2, 3, 1030, 64, false, kNone, 0.25f},
      // head dims 16 and 80, whose tiles do not split evenly over the block's threads: tiled and decoding
      {1, 2, 1, 70, 90, 16, true, kNone},  {2, 2, 2, 40, 70, 80, false, kBool},
      {1, 2, 1, 33, 65, 80, true, kNone, 0.2f}, {1, 4, 2, 3, 1100, 80, false, kAdditive},
      {1, 4, 1, 1, 1030, 16, false, kNone},
      // a local window: key (and, in dK/dV, query) tiles outside it skipped, one side or both, with causal, masks
      // and GQA, rows past the keys that see none (Lq > Lk); a decoding shape, which then runs tiled
      {1, 4, 1, 3, 1100, 64, false, kNone, 0.f, 0.f, 300, 300},
      {1, 2, 1, 200, 150, 64, false, kNone, 0.f, 0.f, 20, 1},  // fp16's bound catches a first query tile skipped
      {1, 2, 2, 100, 200, 128, true, kBool, 0.f, 0.f, 70, -1},
      {1, 2, 1, 90, 130, 32, false, kAdditive, 0.f, 0.f, -1, 0},  {1, 1, 1, 40, 150, 96, false, kNone, 0.f, 0.f, 0, 0},
      // the logit cap, scores (about N(0, 1)) well past it: tiled with causal, masks, GQA, a window; decoding
      {1, 2, 1, 97, 111, 64, true, kNone, 0.f, 0.5f},  {1, 2, 2, 40, 70, 128, false, kAdditive, 0.f, 2.f, 16, 8},
      {1, 2, 1, 45, 77, 32, false, kBool, 0.f, 0.5f},  {1, 8, 2, 3, 1030, 80, false, kNone, 0.f, 0.5f},
  };
  for (size_t i = 0; i < std::size(one_dtype); ++i) {
    if (i % 2 == 0) run<__nv_bfloat16>(one_dtype[i], "bf16", 2e-2);
    else run<__half>(one_dtype[i], "fp16", 4e-3);
  }
  // Packed sequences: partial tiles, a sequence without queries and one without keys, Lq > Lk and Lq < Lk (the
  // window's bottom-right alignment: causal is (-1, 0)), a sequence longer than a tile beside short ones, GQA, the
  // cap with a window; the dK/dV tiles walk queries 64 (D <= 64) or 32 at a time.
  const VarlenCase packed[] = {
      {2, 1, 64, {17, 0, 70, 1, 130}, {17, 5, 40, 0, 200}},
      {2, 2, 32, {100, 3, 64, 20}, {100, 70, 30, 20}, 0.f, -1, 0},
      {4, 2, 128, {65, 130}, {90, 60}, 1.f, 20, 5},
      {2, 1, 96, {33, 200, 7}, {150, 20, 7}, 0.f, 0, 0},
      // KV caches (seqused_k): decoding-like queries against partly used slots, one slot unused, one full; causal
      {4, 1, 64, {1, 3, 1, 70}, {100, 40, 64, 130}, 0.f, -1, 0, {77, 0, 64, 90}},
      // paged (block_table): pages of 16 rows (a tile's keys span pages), of 1 row, and of 100 (longer than a
      // tile); a slot unused, one full, GQA, causal, a window with the cap
      {4, 2, 128, {1, 3, 1, 70}, {100, 40, 64, 130}, 0.f, -1, 0, {77, 0, 64, 90}, 16},
      {2, 1, 32, {2, 5, 1}, {70, 9, 33}, 0.f, -1, -1, {70, 4, 1}, 1},
      {4, 4, 64, {1, 4, 64}, {300, 30, 140}, 1.f, 50, 0, {201, 30, 133}, 100},
      // decoding (decode_kernel.cuh) over packed caches: GQA groups packed into rows, sequences with fewer queries
      // than the longest (blocks past their rows), a sequence without queries, one without keys, caches shorter
      // than a split; causal, a sliding window (its span split, not the cache), the cap; paged; num_splits
      {8, 2, 64, {1, 3, 0, 16, 2}, {1100, 40, 1500, 1030, 0}, 0.f, -1, 0},
      {4, 1, 128, {2, 1, 5}, {1500, 1024, 300}, 0.f, 600, 0, {1400, 1024, 77}},
      {6, 2, 32, {1, 4, 1}, {1200, 1100, 700}, 1.f, -1, -1, {1200, 1090, 650}, 16},
      {4, 2, 96, {3, 1}, {1030, 1100}, 0.f, 300, 2, {}, 0, 5},
      {2, 2, 16, {1, 2}, {1024, 1800}, 0.f, -1, 0, {1000, 1800}, 100, 1},
      {4, 1, 80, {1, 16}, {1050, 1300}, 0.f, -1, -1, {}, 0, 3},
  };
  for (size_t i = 0; i < std::size(packed); ++i) {
    if (i % 2 == 0) run_varlen<__nv_bfloat16>(packed[i], "bf16", 2e-2);
    else run_varlen<__half>(packed[i], "fp16", 4e-3);
  }
  nan_row_in_decoding<__nv_bfloat16>("bf16");
  nan_row_in_decoding<__half>("fp16");
  // A GPU of 40 SMs: 36 key splits, more than the merge's 32 lanes take in one pass.
  emu::sms = 40;
  run<__nv_bfloat16>({1, 2, 1, 1, 9216, 32, false, kNone}, "bf16", 2e-2);
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures != 0;
}
