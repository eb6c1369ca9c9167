// Fused fake quantizers for the CPU: the reference's arithmetic (src/quant/quantizer.rs) in
// one pass over the tensor forward and one backward, for a single bitwidth or a softmax(α)
// mixture of several (the supernet). Composed from libtorch ops, one activation quantizer is
// about ten passes over the activation forward and more backward, and the supernet repeats
// them per candidate: on a 2-core machine those passes, each reading and writing memory, cost
// more than the convolutions.
//
// Forward values are bit-identical to the reference: the same float32 operations in the same
// order (`0.5·(|x| − |x − r| + r)`, true division by the scale, round half to even, the
// branch-ordered sum `Σ q_i·π_i`). Gradients follow the reference formulas exactly, ties
// included (0.5 at x = 0 and at x = r), and differ from its autograd only by float
// summation order. Reductions are split into a fixed number of chunks whatever the thread
// count, so results do not depend on it.
//
// Exceptions never cross into Rust: every entry point catches and stores the message for
// `gmpq_fused_last_error`.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

namespace {

thread_local std::string last_error;

constexpr int64_t kBlock = 1024;
constexpr int64_t kMaxChunks = 64;

// Round half to even for |v| < 2^22 under the default rounding mode; vectorises with SSE2
// where std::nearbyint would be a library call per element.
inline float round_even(float v) {
  // Correct only without fast-math, which would fold it away (build.rs never enables it).
  const float magic = 12582912.0f;  // 1.5 · 2^23
  return (v + magic) - magic;
}

inline float sgn(float v) { return (v > 0.0f ? 1.0f : 0.0f) - (v < 0.0f ? 1.0f : 0.0f); }

// One quantizer candidate: its clip (or threshold) and scale, as the reference computes them.
struct Candidate {
  float clip;
  float scale;
};

int64_t act_levels(int64_t bits, bool is_signed) {
  return is_signed ? (int64_t(1) << (bits - 1)) - 1 : (int64_t(1) << bits) - 1;
}

// The reference reads r with `.item()` (float → double), divides in double and the tensor op
// then uses the scale as float.
std::vector<Candidate> act_candidates(const at::Tensor& clips, const std::vector<int64_t>& bits,
                                      bool is_signed) {
  auto c = clips.detach().to(at::kFloat).contiguous();
  const float* r = c.data_ptr<float>();
  std::vector<Candidate> out;
  for (size_t i = 0; i < bits.size(); ++i) {
    double s = static_cast<double>(r[i]) / static_cast<double>(act_levels(bits[i], is_signed));
    out.push_back({r[i], static_cast<float>(s)});
  }
  return out;
}

// An empty `mix` tensor stands for "one bitwidth, no mixture" (autograd functions take no
// undefined inputs).
bool is_mixed(const at::Tensor& mix) { return mix.numel() > 0; }

std::vector<float> mix_weights(const at::Tensor& mix, size_t k) {
  if (!is_mixed(mix)) return std::vector<float>(k, 1.0f);
  auto m = mix.detach().to(at::kFloat).contiguous();
  return std::vector<float>(m.data_ptr<float>(), m.data_ptr<float>() + k);
}

// A dense (contiguous or channels-last) tensor: its buffer is walked element by element.
at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// `g` laid out like `like`, so both buffers can be walked with one index.
at::Tensor same_layout(const at::Tensor& g, const at::Tensor& like) {
  if (g.strides() == like.strides() && g.is_non_overlapping_and_dense()) return g;
  return at::empty_like(like).copy_(g);
}

struct Chunks {
  int64_t n, count;
  explicit Chunks(int64_t numel)
      : n(numel), count(std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, numel / 16384))) {}
  int64_t begin(int64_t c) const { return n * c / count; }
  int64_t end(int64_t c) const { return n * (c + 1) / count; }
};

// ----- activations -------------------------------------------------------------------------
//
// Each kernel walks the tensor in blocks of kBlock elements and, per candidate, runs short
// branch-free loops over the block (kept in L1) that the compiler vectorises: one computing
// per-element values into stack buffers, then plain combining loops. Sums use kLanes
// independent float accumulators per block (vectorisable without reassociation, which
// strict float semantics forbid) and double across blocks.

constexpr int64_t kLanes = 16;

// Σ a[j]·b[j] over one block.
inline double dot_block(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[kLanes] = {0.0f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  double total = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

// The reference's clipped value and quantized value of one candidate over a block.
void act_q_block(const float* __restrict x, float* __restrict q, int64_t n, float r, float s,
                 bool is_signed) {
  if (is_signed) {
    for (int64_t j = 0; j < n; ++j) {
      const float xc = (std::fabs(x[j] + r) - std::fabs(x[j] - r)) * 0.5f;
      q[j] = round_even(xc / s) * s;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float xc = ((std::fabs(x[j]) - std::fabs(x[j] - r)) + r) * 0.5f;
      q[j] = round_even(xc / s) * s;
    }
  }
}

// ∂x_c/∂x and ∂x_c/∂r of one candidate over a block (the reference's sign formulas).
void act_slopes_block(const float* __restrict x, float* __restrict dx, float* __restrict dr,
                      int64_t n, float r, bool is_signed) {
  if (is_signed) {
    for (int64_t j = 0; j < n; ++j) {
      const float a = sgn(x[j] + r), b = sgn(x[j] - r);
      dx[j] = 0.5f * (a - b);
      dr[j] = 0.5f * (a + b);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float b = sgn(x[j] - r);
      dx[j] = 0.5f * (sgn(x[j]) - b);
      dr[j] = 0.5f * (1.0f + b);
    }
  }
}

// dst = a·p (first candidate) or dst += a·p; without a mixture, dst = a.
inline void mix_into(float* __restrict dst, const float* __restrict a, int64_t n, float p,
                     bool mixed, bool first) {
  if (!mixed) {
    for (int64_t j = 0; j < n; ++j) dst[j] = a[j];
  } else if (first) {
    for (int64_t j = 0; j < n; ++j) dst[j] = a[j] * p;
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = dst[j] + a[j] * p;
  }
}

void act_forward_kernel(const float* x, float* out, int64_t n, const std::vector<Candidate>& cs,
                        const std::vector<float>& pi, bool mixed, bool is_signed) {
  at::parallel_for(0, n, kBlock, [&](int64_t b0, int64_t b1) {
    float q[kBlock];
    for (int64_t lo = b0; lo < b1; lo += kBlock) {
      const int64_t len = std::min(b1, lo + kBlock) - lo;
      for (size_t i = 0; i < cs.size(); ++i) {
        act_q_block(x + lo, q, len, cs[i].clip, cs[i].scale, is_signed);
        mix_into(out + lo, q, len, pi[i], mixed, i == 0);
      }
    }
  });
}

// grad_x = Σ_i g·π_i·∂x_c,i/∂x; grad_r_i = Σ g·π_i·∂x_c,i/∂r_i; grad_π_i = Σ g·q_i.
void act_backward_kernel(const float* g, const float* x, float* gx, int64_t n,
                         const std::vector<Candidate>& cs, const std::vector<float>& pi,
                         bool mixed, bool is_signed, std::vector<double>& grad_r,
                         std::vector<double>& grad_pi) {
  const size_t k = cs.size();
  Chunks chunks(n);
  std::vector<double> part(chunks.count * 2 * k, 0.0);
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    float gq[kBlock], dx[kBlock], dr[kBlock], q[kBlock];
    for (int64_t c = c0; c < c1; ++c) {
      double* pr = &part[c * 2 * k];
      double* pp = pr + k;
      for (int64_t lo = chunks.begin(c); lo < chunks.end(c); lo += kBlock) {
        const int64_t len = std::min(chunks.end(c), lo + kBlock) - lo;
        const float* gb = g + lo;
        float* gxb = gx + lo;
        for (size_t i = 0; i < k; ++i) {
          act_slopes_block(x + lo, dx, dr, len, cs[i].clip, is_signed);
          const float* gi = gb;  // the gradient reaching this candidate's q: g·π_i
          if (mixed) {
            for (int64_t j = 0; j < len; ++j) gq[j] = gb[j] * pi[i];
            gi = gq;
          }
          if (i == 0) {
            for (int64_t j = 0; j < len; ++j) gxb[j] = gi[j] * dx[j];
          } else {
            for (int64_t j = 0; j < len; ++j) gxb[j] = gxb[j] + gi[j] * dx[j];
          }
          pr[i] += dot_block(gi, dr, len);
          if (mixed) {
            act_q_block(x + lo, q, len, cs[i].clip, cs[i].scale, is_signed);
            pp[i] += dot_block(gb, q, len);
          }
        }
      }
    }
  });
  grad_r.assign(k, 0.0);
  grad_pi.assign(k, 0.0);
  for (int64_t c = 0; c < chunks.count; ++c)
    for (size_t i = 0; i < k; ++i) {
      grad_r[i] += part[c * 2 * k + i];
      grad_pi[i] += part[c * 2 * k + k + i];
    }
}

struct ActQuant : public Function<ActQuant> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor x, at::Tensor clips, at::Tensor mix,
                            std::vector<int64_t> bits, bool is_signed) {
    at::Tensor xd = dense(x);
    auto cs = act_candidates(clips, bits, is_signed);
    auto pi = mix_weights(mix, bits.size());
    at::Tensor out = at::empty_like(xd);
    act_forward_kernel(xd.data_ptr<float>(), out.data_ptr<float>(), xd.numel(), cs, pi,
                       is_mixed(mix), is_signed);
    ctx->save_for_backward({xd, clips, mix});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["signed"] = is_signed;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& clips = saved[1];
    const at::Tensor& mix = saved[2];
    auto bits = ctx->saved_data["bits"].toIntVector();
    bool is_signed = ctx->saved_data["signed"].toBool();
    auto cs = act_candidates(clips, bits, is_signed);
    auto pi = mix_weights(mix, bits.size());
    at::Tensor g = same_layout(grads[0].to(at::kFloat), x);
    at::Tensor gx = at::empty_like(x);
    std::vector<double> gr, gp;
    act_backward_kernel(g.data_ptr<float>(), x.data_ptr<float>(), gx.data_ptr<float>(),
                        x.numel(), cs, pi, is_mixed(mix), is_signed, gr, gp);
    auto opts = clips.options().dtype(at::kDouble);
    at::Tensor grad_clips =
        at::tensor(gr, opts).to(clips.scalar_type()).reshape(clips.sizes());
    at::Tensor grad_mix;
    if (is_mixed(mix)) grad_mix = at::tensor(gp, opts).to(mix.scalar_type()).reshape(mix.sizes());
    return {gx, grad_clips, grad_mix, at::Tensor(), at::Tensor()};
  }
};

// ----- weights -----------------------------------------------------------------------------

// Per-tensor (one value) or per-output-channel thresholds, each element's found by
// `index / inner`.
struct Thresholds {
  std::vector<float> t;
  int64_t inner;
};

Thresholds thresholds(const at::Tensor& thr, const at::Tensor& w) {
  auto c = thr.detach().to(at::kFloat).contiguous();
  Thresholds out;
  out.t.assign(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
  out.inner = std::max<int64_t>(1, w.numel() / std::max<int64_t>(1, c.numel()));
  return out;
}

// Reference: s = t / levels (float tensor op), q = round(clamp(w, −t, t) / s) · s, over the
// block of elements [first, first + n), in runs that share one threshold.
void weight_q_block(const float* __restrict w, float* __restrict q, int64_t first, int64_t n,
                    const Thresholds& th, int64_t bits) {
  const float levels = static_cast<float>((int64_t(1) << (bits - 1)) - 1);
  int64_t j = 0;
  while (j < n) {
    const int64_t channel = (first + j) / th.inner;
    const int64_t run_end = std::min(n, (channel + 1) * th.inner - first);
    const float t = th.t[channel], s = t / levels;
    for (int64_t m = j; m < run_end; ++m) {
      const float c = std::min(std::max(w[m], -t), t);
      q[m] = round_even(c / s) * s;
    }
    j = run_end;
  }
}

struct WeightQuant : public Function<WeightQuant> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor w, at::Tensor thr, at::Tensor mix,
                            std::vector<int64_t> bits) {
    // Keeps the kernel's memory layout (training stores conv weights channels-last, which the
    // convolution runs faster on). Per-channel thresholds need the output channel outermost.
    at::Tensor wd = dense(w);
    if (thr.numel() > 1 && wd.dim() > 0 && wd.stride(0) * wd.size(0) != wd.numel())
      wd = wd.contiguous();
    auto th = thresholds(thr, wd);
    auto pi = mix_weights(mix, bits.size());
    const bool mixed = is_mixed(mix);
    at::Tensor out = at::empty_like(wd);
    const float* src = wd.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const int64_t n = wd.numel();
    at::parallel_for(0, n, kBlock, [&](int64_t b0, int64_t b1) {
      float q[kBlock];
      for (int64_t lo = b0; lo < b1; lo += kBlock) {
        const int64_t len = std::min(b1, lo + kBlock) - lo;
        for (size_t i = 0; i < bits.size(); ++i) {
          weight_q_block(src + lo, q, lo, len, th, bits[i]);
          mix_into(dst + lo, q, len, pi[i], mixed, i == 0);
        }
      }
    });
    ctx->save_for_backward({wd, thr, mix});
    ctx->saved_data["bits"] = bits;
    return out;
  }

  // Straight-through: grad_w = Σ_i g·π_i (g for one bitwidth); grad_π_i = Σ g·q_i.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& w = saved[0];
    const at::Tensor& thr = saved[1];
    const at::Tensor& mix = saved[2];
    if (!is_mixed(mix)) return {grads[0], at::Tensor(), at::Tensor(), at::Tensor()};
    auto bits = ctx->saved_data["bits"].toIntVector();
    const size_t k = bits.size();
    auto th = thresholds(thr, w);
    auto pi = mix_weights(mix, k);
    at::Tensor g = same_layout(grads[0].to(at::kFloat), w);
    at::Tensor gw = at::empty_like(w);
    const float* gp = g.data_ptr<float>();
    const float* src = w.data_ptr<float>();
    float* dst = gw.data_ptr<float>();
    Chunks chunks(w.numel());
    std::vector<double> part(chunks.count * k, 0.0);
    at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
      float q[kBlock];
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t lo = chunks.begin(c); lo < chunks.end(c); lo += kBlock) {
          const int64_t len = std::min(chunks.end(c), lo + kBlock) - lo;
          for (size_t i = 0; i < k; ++i) {
            // grad_w accumulates g·π_i over the candidates, as autograd sums the branches.
            mix_into(dst + lo, gp + lo, len, pi[i], true, i == 0);
            weight_q_block(src + lo, q, lo, len, th, bits[i]);
            part[c * k + i] += dot_block(gp + lo, q, len);
          }
        }
      }
    });
    std::vector<double> sums(k, 0.0);
    for (int64_t c = 0; c < chunks.count; ++c)
      for (size_t i = 0; i < k; ++i) sums[i] += part[c * k + i];
    at::Tensor grad_mix =
        at::tensor(sums, mix.options().dtype(at::kDouble)).to(mix.scalar_type()).reshape(mix.sizes());
    return {gw, at::Tensor(), grad_mix, at::Tensor()};
  }
};

std::vector<int64_t> bits_vec(const int64_t* bits, int64_t k) {
  return std::vector<int64_t>(bits, bits + k);
}

}  // namespace

extern "C" {

// `mix` may be null: one bitwidth, no mixture. Returns null on error (see
// gmpq_fused_last_error).
at::Tensor* gmpq_fused_quantize_activation(const at::Tensor* x, const at::Tensor* clips,
                                           const at::Tensor* mix, const int64_t* bits,
                                           int64_t k, int is_signed) {
  try {
    at::Tensor m = mix ? *mix : at::empty({0}, x->options().requires_grad(false));
    return new at::Tensor(ActQuant::apply(*x, *clips, m, bits_vec(bits, k), is_signed != 0));
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

at::Tensor* gmpq_fused_quantize_weight(const at::Tensor* w, const at::Tensor* threshold,
                                       const at::Tensor* mix, const int64_t* bits, int64_t k) {
  try {
    at::Tensor m = mix ? *mix : at::empty({0}, w->options().requires_grad(false));
    return new at::Tensor(WeightQuant::apply(*w, *threshold, m, bits_vec(bits, k)));
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

const char* gmpq_fused_last_error() { return last_error.c_str(); }

}  // extern "C"
