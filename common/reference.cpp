#include "common/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace lab {

int seqlen_q_of(const HostProblem& hp, int b) {
  if (!hp.cu_seqlens_q.empty()) return hp.cu_seqlens_q[b + 1] - hp.cu_seqlens_q[b];
  return hp.shape.seqlen_q;
}

int seqlen_kv_of(const HostProblem& hp, int b) {
  if (!hp.cache_seqlens.empty()) return hp.cache_seqlens[b];
  if (!hp.cu_seqlens_kv.empty()) return hp.cu_seqlens_kv[b + 1] - hp.cu_seqlens_kv[b];
  return hp.shape.seqlen_kv;
}

int visible_keys(bool causal, int i, int sq, int sk) {
  if (!causal) return sk;
  return std::clamp(i + sk - sq + 1, 0, sk);
}

int64_t q_offset(const AttnParams& p, int b, int i, int h) {
  // With cu_seqlens_q the caller passes the packed row index through the b/i pair below.
  return int64_t(b) * p.q_batch_stride + int64_t(i) * p.q_row_stride + int64_t(h) * p.q_head_stride;
}

int64_t o_offset(const AttnParams& p, int b, int i, int h) {
  return int64_t(b) * p.o_batch_stride + int64_t(i) * p.o_row_stride + int64_t(h) * p.o_head_stride;
}

int64_t lse_offset(const AttnParams& p, int b, int h, int i) {
  return (int64_t(b) * p.heads_q + h) * p.seqlen_q + i;
}

namespace {

// Packed-row form of a (sequence, row) pair: varlen tensors have no batch stride.
void packed_q(const HostProblem& hp, int& b, int& i) {
  if (!hp.cu_seqlens_q.empty()) {
    i += hp.cu_seqlens_q[b];
    b = 0;
  }
}

}  // namespace

int64_t kv_offset(const HostProblem& hp, bool is_v, int b, int j, int h_kv) {
  const AttnParams& p = hp.shape;
  const int64_t bs = is_v ? p.v_batch_stride : p.k_batch_stride;
  const int64_t rs = is_v ? p.v_row_stride : p.k_row_stride;
  const int64_t hs = is_v ? p.v_head_stride : p.k_head_stride;
  if (!hp.block_table.empty()) {
    const int page = hp.block_table[size_t(b) * p.max_pages_per_seq + j / p.page_size];
    return int64_t(page) * bs + int64_t(j % p.page_size) * rs + int64_t(h_kv) * hs;
  }
  if (!hp.cu_seqlens_kv.empty()) return int64_t(hp.cu_seqlens_kv[b] + j) * rs + int64_t(h_kv) * hs;
  return int64_t(b) * bs + int64_t(j) * rs + int64_t(h_kv) * hs;
}

std::vector<float> alibi_slopes_standard(int heads) {
  auto pow2_slopes = [](int n) {
    std::vector<float> s(n);
    const double start = std::pow(2.0, -8.0 / n);
    for (int i = 0; i < n; ++i) s[i] = float(std::pow(start, i + 1));
    return s;
  };
  int closest = 1;
  while (closest * 2 <= heads) closest *= 2;
  std::vector<float> slopes = pow2_slopes(closest);
  if (closest < heads) {
    std::vector<float> extra = pow2_slopes(2 * closest);
    for (int i = 0; int(slopes.size()) < heads; i += 2) slopes.push_back(extra[i]);
  }
  return slopes;
}

double reference_probs(const HostProblem& hp, int b, int h, int i, std::vector<double>& prob) {
  const AttnParams& p = hp.shape;
  const int sq = seqlen_q_of(hp, b), sk = seqlen_kv_of(hp, b);
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int n = visible_keys(p.causal, i, sq, sk);
  prob.assign(size_t(sk), 0.0);
  if (n == 0) return -std::numeric_limits<double>::infinity();

  int qb = b, qi = i;
  packed_q(hp, qb, qi);
  const float* q = hp.q.data() + q_offset(p, qb, qi, h);
  const double slope = hp.alibi_slopes.empty() ? 0.0 : hp.alibi_slopes[h];
  double m = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int j = 0; j < n; ++j) {
    const float* k = hp.k.data() + kv_offset(hp, false, b, j, h_kv);
    double dot = 0;
    for (int c = 0; c < p.head_dim; ++c) dot += double(q[c]) * double(k[c]);
    // ALiBi as FlashAttention defines it: minus slope times the distance from the diagonal.
    double s = double(p.softmax_scale) * dot - slope * std::abs(double(i + sk - sq - j));
    prob[j] = s;
    nan |= std::isnan(s);
    m = std::max(m, s);
  }
  // The lab's NaN rule (common/attn.h): a NaN score (from q row i or a visible key) makes the
  // whole row NaN; std::max above would have dropped it.
  if (nan) {
    std::fill(prob.begin(), prob.begin() + n, std::numeric_limits<double>::quiet_NaN());
    return std::numeric_limits<double>::quiet_NaN();
  }
  double l = 0;
  for (int j = 0; j < n; ++j) l += std::exp(prob[j] - m);
  for (int j = 0; j < n; ++j) prob[j] = std::exp(prob[j] - m) / l;
  return m + std::log(l);
}

double reference_row(const HostProblem& hp, int b, int h, int i, double* out) {
  const AttnParams& p = hp.shape;
  thread_local std::vector<double> prob;
  const double lse = reference_probs(hp, b, h, i, prob);
  const int h_kv = h / (p.heads_q / p.heads_kv);
  std::fill(out, out + p.head_dim, 0.0);
  // Every visible key, also one whose weight underflowed to 0: 0 * NaN in V[j][c] is NaN, as in the
  // kernels' P V (the NaN rule). Keys the row does not see are never read.
  const int n = visible_keys(p.causal, i, seqlen_q_of(hp, b), seqlen_kv_of(hp, b));
  for (int j = 0; j < n; ++j) {
    const float* v = hp.v.data() + kv_offset(hp, true, b, j, h_kv);
    for (int c = 0; c < p.head_dim; ++c) out[c] += prob[j] * double(v[c]);
  }
  return lse;
}

}  // namespace lab
