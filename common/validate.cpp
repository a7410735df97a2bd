#include "common/validate.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "common/fill.h"

namespace lab {

Tolerance tolerance_for(DType t) {
  const double eps = t == DType::fp16 ? 1.0 / 1024 : 1.0 / 128;
  return {8 * eps, 2 * eps, 1e-3};
}

std::string CheckReport::summary() const {
  char buf[320];
  int n = std::snprintf(buf, sizeof buf, "%s  max_abs %.2e  rel_l2 %.2e", ok ? "PASS" : "FAIL",
                        max_abs_err, rel_l2_err);
  if (lse_max_err > 0) n += std::snprintf(buf + n, sizeof buf - n, "  lse %.1e", lse_max_err);
  std::snprintf(buf + n, sizeof buf - n, "  (%s %lld of %lld rows vs fp64 CPU reference)",
                sampled ? "sampled" : "all", (long long)rows_checked, (long long)rows_total);
  std::string s = buf;
  if (!ok) s += ": " + failure;
  return s;
}

namespace {

struct Row {
  int b, h, i;
};

// Rows chosen for a sampled check of one (batch, head): first and last rows, rows on both sides
// of the usual tile edges, and random rows.
std::vector<int> sample_rows(int sq, int n_random, std::mt19937_64& rng) {
  std::set<int> rows;
  for (int r : {0, 1, 15, 16, 31, 32, 63, 64, 65, 127, 128, 129, 255, 256})
    if (r < sq) rows.insert(r);
  for (int r : {sq - 1, sq - 2, sq - 64, sq - 65})
    if (r >= 0) rows.insert(r);
  std::uniform_int_distribution<int> pick(0, sq - 1);
  for (int k = 0; k < n_random; ++k) rows.insert(pick(rng));
  return {rows.begin(), rows.end()};
}

}  // namespace

CheckReport check_output(const HostProblem& hp, const std::vector<uint16_t>& o_bits,
                         const std::vector<float>& lse, const CheckOptions& opt) {
  const AttnParams& p = hp.shape;
  const DType t = p.dtype;
  const uint16_t poison_pattern = poison_bits(t);
  CheckReport r;
  std::ostringstream why;
  auto fail = [&](const std::string& s) {
    if (why.tellp() == 0) why << s;
  };

  // 1. Every logical output element: written, finite. Over all of O (tens of millions of elements
  // at the ladder's prefill shapes), in parallel over query rows; the message names the first bad
  // element in (b, i, h, c) order whatever the threads' order, as a serial scan would.
  const unsigned n_threads = std::max(1u, std::min(std::thread::hardware_concurrency(), 64u));
  int64_t total_rows = 0;
  double ref_cost = 0;
  std::vector<int64_t> row_start(size_t(p.batch) + 1, 0);  // (b, i) pairs before sequence b
  for (int b = 0; b < p.batch; ++b) {
    const int sq = seqlen_q_of(hp, b), sk = seqlen_kv_of(hp, b);
    total_rows += int64_t(sq) * p.heads_q;
    ref_cost += 4.0 * sq * double(sk) * p.head_dim * p.heads_q;
    row_start[size_t(b) + 1] = row_start[size_t(b)] + sq;
  }
  {
    const int64_t n_rows = row_start.back();
    const int64_t slot = int64_t(p.head_dim) + 1;  // c = 0 .. d - 1, then the row's lse
    std::atomic<int64_t> next{0};
    std::mutex mu;
    int64_t first_key = INT64_MAX;
    std::string first_msg;
    auto scan = [&] {
      int64_t unwritten = 0, nan_or_inf = 0, lse_unwritten = 0, key = INT64_MAX;
      std::string msg;
      constexpr int64_t kChunk = 64;
      for (int64_t r0; (r0 = next.fetch_add(kChunk)) < n_rows;) {
        for (int64_t rr = r0; rr < std::min(n_rows, r0 + kChunk); ++rr) {
          const int b = int(std::upper_bound(row_start.begin(), row_start.end(), rr) - row_start.begin()) - 1;
          const int i = int(rr - row_start[size_t(b)]);
          int pb = b, pi = i;
          if (!hp.cu_seqlens_q.empty()) pi += hp.cu_seqlens_q[b], pb = 0;
          for (int h = 0; h < p.heads_q; ++h) {
            const int64_t base = (rr * p.heads_q + h) * slot;
            const uint16_t* row = o_bits.data() + o_offset(p, pb, pi, h);
            for (int c = 0; c < p.head_dim; ++c) {
              const char* what = nullptr;
              if (row[c] == poison_pattern) ++unwritten, what = "] was never written";
              else if (!std::isfinite(half_bits_to_float(row[c], t))) ++nan_or_inf, what = "] is NaN or Inf";
              if (what && base + c < key) {
                key = base + c;
                msg = "O[b=" + std::to_string(b) + ", i=" + std::to_string(i) + ", h=" + std::to_string(h) +
                      ", c=" + std::to_string(c) + what;
              }
            }
            if (!lse.empty()) {
              uint32_t bits;
              const float v = lse[lse_offset(p, b, h, i)];
              std::memcpy(&bits, &v, 4);
              if (bits == kPoisonF32) {
                ++lse_unwritten;
                if (base + p.head_dim < key) {
                  key = base + p.head_dim;
                  msg = "lse[b=" + std::to_string(b) + ", h=" + std::to_string(h) + ", i=" + std::to_string(i) +
                        "] was never written";
                }
              }
            }
          }
        }
      }
      std::lock_guard<std::mutex> g(mu);
      r.unwritten += unwritten, r.nan_or_inf += nan_or_inf, r.lse_unwritten += lse_unwritten;
      if (key < first_key) first_key = key, first_msg = msg;
    };
    std::vector<std::thread> pool;
    for (unsigned t_i = 0; t_i + 1 < n_threads && int64_t(t_i + 1) * 4096 < n_rows; ++t_i) pool.emplace_back(scan);
    scan();
    for (auto& th : pool) th.join();
    if (!first_msg.empty()) fail(first_msg);
  }
  r.rows_total = total_rows;

  // 2. Which rows get the fp64 reference.
  std::vector<Row> rows;
  r.sampled = !opt.all_rows && ref_cost > opt.budget_flops;
  std::mt19937_64 rng(opt.seed);
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.heads_q; ++h) {
      const int sq = seqlen_q_of(hp, b);
      if (!r.sampled) {
        for (int i = 0; i < sq; ++i) rows.push_back({b, h, i});
      } else {
        for (int i : sample_rows(sq, opt.sampled_rows_per_head, rng)) rows.push_back({b, h, i});
      }
    }
  if (r.sampled && opt.max_sampled_rows > 0 && int64_t(rows.size()) > opt.max_sampled_rows) {
    // Keep every sampled row (edges included) of the first and the last (batch, head), and a
    // seeded random subset of the rest up to the cap.
    const Row first = rows.front(), last = rows.back();
    std::vector<Row> kept, rest;
    for (const Row& w : rows)
      ((w.b == first.b && w.h == first.h) || (w.b == last.b && w.h == last.h) ? kept : rest).push_back(w);
    std::shuffle(rest.begin(), rest.end(), rng);
    const int64_t room = std::max<int64_t>(0, opt.max_sampled_rows - int64_t(kept.size()));
    kept.insert(kept.end(), rest.begin(), rest.begin() + std::min<int64_t>(room, int64_t(rest.size())));
    rows = kept;
  }
  r.rows_checked = int64_t(rows.size());

  // 3. Compare, in parallel over rows.
  const Tolerance tol = tolerance_for(t);
  std::atomic<size_t> next{0};
  std::mutex mu;
  double sum_err2 = 0, sum_ref2 = 0, max_err = 0, max_ref = 0, lse_err = 0;
  std::string first_bad_lse;
  struct Worst { double err = -1; Row at{}; int c = 0; double got = 0, want = 0; } worst;
  auto work = [&] {
    std::vector<double> ref(size_t(p.head_dim));
    double e2 = 0, r2 = 0, me = 0, mr = 0, le = 0;
    Worst w;
    std::string bad_lse;
    for (size_t k; (k = next.fetch_add(1)) < rows.size();) {
      const Row row = rows[k];
      const double ref_lse = reference_row(hp, row.b, row.h, row.i, ref.data());
      int pb = row.b, pi = row.i;
      if (!hp.cu_seqlens_q.empty()) pi += hp.cu_seqlens_q[row.b], pb = 0;
      const uint16_t* got = o_bits.data() + o_offset(p, pb, pi, row.h);
      for (int c = 0; c < p.head_dim; ++c) {
        const double g = half_bits_to_float(got[c], t);
        const double err = std::fabs(g - ref[c]);
        if (!(err <= me)) me = std::isnan(err) ? INFINITY : err;
        if (!(err <= w.err)) w = {std::isnan(err) ? INFINITY : err, row, c, g, ref[c]};
        e2 += std::isnan(err) ? INFINITY : err * err;
        r2 += ref[c] * ref[c];
        mr = std::max(mr, std::fabs(ref[c]));
      }
      if (!lse.empty()) {
        const double got_lse = lse[lse_offset(p, row.b, row.h, row.i)];
        double err;
        if (std::isinf(ref_lse)) err = (got_lse == ref_lse) ? 0.0 : INFINITY;
        else err = std::fabs(got_lse - ref_lse);
        if (std::isnan(err)) err = INFINITY;
        if (err > le) {
          le = err;
          if (err > tol.lse_abs && bad_lse.empty())
            bad_lse = "lse[b=" + std::to_string(row.b) + ", h=" + std::to_string(row.h) + ", i=" +
                      std::to_string(row.i) + "] = " + std::to_string(got_lse) + ", expected " +
                      std::to_string(ref_lse);
        }
      }
    }
    std::lock_guard<std::mutex> g(mu);
    sum_err2 += e2, sum_ref2 += r2;
    max_err = std::max(max_err, me), max_ref = std::max(max_ref, mr);
    lse_err = std::max(lse_err, le);
    if (w.err > worst.err) worst = w;
    if (first_bad_lse.empty()) first_bad_lse = bad_lse;
  };
  std::vector<std::thread> pool;
  for (unsigned t_i = 0; t_i + 1 < n_threads; ++t_i) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();

  r.max_abs_err = max_err;
  r.max_abs_ref = max_ref;
  r.rel_l2_err = sum_ref2 > 0 ? std::sqrt(sum_err2 / sum_ref2) : std::sqrt(sum_err2);
  r.lse_max_err = lse_err;

  const double abs_tol = tol.max_abs * std::max(1.0, max_ref);
  if (!(r.max_abs_err <= abs_tol)) {
    std::ostringstream s;
    s << "max_abs " << r.max_abs_err << " > " << abs_tol << " at O[b=" << worst.at.b << ", i="
      << worst.at.i << ", h=" << worst.at.h << ", c=" << worst.c << "]: got " << worst.got
      << ", expected " << worst.want;
    fail(s.str());
  }
  if (!(r.rel_l2_err <= tol.rel_l2)) {
    std::ostringstream s;
    s << "rel_l2 " << r.rel_l2_err << " > " << tol.rel_l2;
    fail(s.str());
  }
  if (!lse.empty() && !(r.lse_max_err <= tol.lse_abs))
    fail(first_bad_lse.empty() ? "lse error " + std::to_string(r.lse_max_err) : first_bad_lse);
  r.failure = why.str();
  r.ok = r.failure.empty();
  return r;
}

}  // namespace lab
