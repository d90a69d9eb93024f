// Fused float32 CPU ops for the native engine's steps (see ops.py and decode.py).
//
// At one token per sequence, a Llama layer in eager PyTorch is ~60 small ops whose dispatch
// costs more than the layer's int8 GEMMs; these ops do the work between the GEMMs in a few
// calls: RMSNorm with the residual add, SiLU(gate) * up, and RoPE + KV write + attention over
// the paged cache. Plain loops that the compiler vectorizes (built with -O3 for the CPU
// baseline, never -march=native); at::parallel_for splits the work over torch's threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void rms_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float r = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for -87 <= x <= 0 (softmax scores less their maximum; lower ones are clamped there, where
// exp is below 2^-125): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6
// (relative error below 2e-7), times 2^n built in the exponent bits.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts (Cody-Waite)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.f / 720.f);
  for (const float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(bits));
}
#endif

// q . k: eight lanes of partial sums (two accumulators, so that the FMAs overlap), in one order.
inline float dot(const float* q, const float* k, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef __AVX2__
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a);
    b = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), b);
  }
  sum = hsum(_mm256_add_ps(a, b));
#endif
  for (; i < n; ++i) sum += q[i] * k[i];
  return sum;
}

// s[p] = exp(s[p] - top) for p < n; returns their sum (eight lanes, then the tail, in one order).
inline float exp_shifted(float* s, int64_t n, float top) {
  int64_t p = 0;
  float sum = 0.f;
#ifdef __AVX2__
  const __m256 shift = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  for (; p + 8 <= n; p += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + p), shift));
    _mm256_storeu_ps(s + p, e);
    total = _mm256_add_ps(total, e);
  }
  sum = hsum(total);
#endif
  for (; p < n; ++p) {
    s[p] = std::exp(s[p] - top);
    sum += s[p];
  }
  return sum;
}

// out[i] = scale * sum_p w[p] * v_p[i] over the rows `values(p)`, p < n, each element summed in
// order of p; 32 elements at a time in registers (then 8, then one).
template <typename Rows>
inline void weighted_sum(const float* w, int64_t n, Rows values, int64_t dim, float scale, float* out) {
  int64_t i = 0;
#ifdef __AVX2__
  for (; i + 32 <= dim; i += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t p = 0; p < n; ++p) {
      const __m256 wp = _mm256_set1_ps(w[p]);
      const float* v = values(p) + i;
      a0 = _mm256_fmadd_ps(wp, _mm256_loadu_ps(v), a0);
      a1 = _mm256_fmadd_ps(wp, _mm256_loadu_ps(v + 8), a1);
      a2 = _mm256_fmadd_ps(wp, _mm256_loadu_ps(v + 16), a2);
      a3 = _mm256_fmadd_ps(wp, _mm256_loadu_ps(v + 24), a3);
    }
    const __m256 f = _mm256_set1_ps(scale);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(a0, f));
    _mm256_storeu_ps(out + i + 8, _mm256_mul_ps(a1, f));
    _mm256_storeu_ps(out + i + 16, _mm256_mul_ps(a2, f));
    _mm256_storeu_ps(out + i + 24, _mm256_mul_ps(a3, f));
  }
  for (; i + 8 <= dim; i += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t p = 0; p < n; ++p) a = _mm256_fmadd_ps(_mm256_set1_ps(w[p]), _mm256_loadu_ps(values(p) + i), a);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(a, _mm256_set1_ps(scale)));
  }
#endif
  for (; i < dim; ++i) {
    float a = 0.f;
    for (int64_t p = 0; p < n; ++p) a += w[p] * values(p)[i];
    out[i] = a * scale;
  }
}

}  // namespace

// rms_norm(x [T, N], w [N]) -> [T, N], as HF's LlamaRMSNorm in float32.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(w, "w");
  const int64_t rows = x.size(0), n = x.size(1);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_row(xp + r * n, wp, op + r * n, n, static_cast<float>(eps));
  });
  return out;
}

// add_rms_norm_(x [T, N], delta [T, N], w [N]): x += delta in place (the residual stream),
// returns rms_norm(x).
torch::Tensor add_rms_norm_(torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(delta, "delta");
  check_f32(w, "w");
  TORCH_CHECK(x.sizes() == delta.sizes(), "x and delta must have one shape");
  const int64_t rows = x.size(0), n = x.size(1);
  auto out = torch::empty_like(x);
  float* xp = x.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = xp + r * n;
      const float* d = dp + r * n;
      for (int64_t i = 0; i < n; ++i) row[i] += d[i];
      rms_row(row, wp, op + r * n, n, static_cast<float>(eps));
    }
  });
  return out;
}

// silu_mul(gate_up [T, 2I]) -> silu(gate) * up [T, I].
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_f32(gate_up, "gate_up");
  const int64_t rows = gate_up.size(0), size = gate_up.size(1) / 2;
  auto out = torch::empty({rows, size}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = gp + r * 2 * size;
      const float* up = gate + size;
      float* o = op + r * size;
      for (int64_t i = 0; i < size; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

// One query row per token: a decode token, each token of a prefill chunk, each guess under
// verification. qkv [T, (H + 2 Hkv) D] is the fused projection (q and k features in adjacent
// rotary pairs); cos, sin [P, D / 2] the rotary tables; k_cache, v_cache [Hkv, blocks,
// block_size, D] one layer of the pool (head-major). Row t belongs to sequence row_seqs[t],
// whose blocks are block_tables[row_seqs[t]], and sits at positions[t]: first every row's k
// (rotated) and v are written at slots[t]; then each query head of row t, rotated, attends
// over the positions[t] + 1 keys before and at it (the rows of its own chunk included).
// A row's arithmetic never depends on the rows beside it: a token computed in a prefill chunk,
// in a verification or alone as a decode gets the same bits. Returns [T, H D].
torch::Tensor token_attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                              const torch::Tensor& positions, torch::Tensor& k_cache, torch::Tensor& v_cache,
                              const torch::Tensor& slots, const torch::Tensor& block_tables,
                              const torch::Tensor& row_seqs, int64_t num_heads, double scale) {
  check_f32(qkv, "qkv");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  for (const auto* t : {&positions, &slots, &block_tables, &row_seqs}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(), "indices must be contiguous int64");
  }
  const int64_t rows = qkv.size(0), kv_heads = k_cache.size(0), num_blocks = k_cache.size(1);
  const int64_t block_size = k_cache.size(2), dim = k_cache.size(3), half = dim / 2;
  const int64_t heads = num_heads, group = heads / kv_heads, width = block_tables.size(1);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv width does not match the heads");
  TORCH_CHECK(cos.size(1) == half && sin.size(1) == half, "rotary tables must be [positions, head_dim / 2]");
  TORCH_CHECK(positions.size(0) == rows && slots.size(0) == rows && row_seqs.size(0) == rows,
              "positions, slots and row_seqs need one entry per row");
  auto out = torch::empty({rows, heads * dim}, qkv.options());
  const float* qkv_p = qkv.data_ptr<float>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  const int64_t* pos_p = positions.data_ptr<int64_t>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t* table_p = block_tables.data_ptr<int64_t>();
  const int64_t* seq_p = row_seqs.data_ptr<int64_t>();
  float* k_p = k_cache.data_ptr<float>();
  float* v_p = v_cache.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const int64_t row_width = qkv.size(1), head_stride = num_blocks * block_size * dim;
  const float fscale = static_cast<float>(scale);

  // Pass 1: every row's K and V into the pool, so that a row can attend to its chunk's earlier rows.
  at::parallel_for(0, rows * kv_heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / kv_heads, h = task % kv_heads;
      const float* row = qkv_p + t * row_width;
      const float* c = cos_p + pos_p[t] * half;
      const float* s = sin_p + pos_p[t] * half;
      float* k_dst = k_p + h * head_stride + slot_p[t] * dim;
      const float* k_src = row + (heads + h) * dim;
      const float* v_src = row + (heads + kv_heads + h) * dim;
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = k_src[2 * i], x1 = k_src[2 * i + 1];
        k_dst[2 * i] = x0 * c[i] - x1 * s[i];
        k_dst[2 * i + 1] = x1 * c[i] + x0 * s[i];
      }
      std::copy(v_src, v_src + dim, v_p + h * head_stride + slot_p[t] * dim);
    }
  });

  // Pass 2: attention, one (row, query head) per task; the keys and values of a row's sequence
  // block by block (a block's slots are contiguous in the pool). The rows are taken first, last,
  // second, second to last, ...: parallel_for gives each thread one contiguous range, and a
  // prefill chunk's late rows attend over many more keys than its early ones.
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(dim), scores;
    std::vector<const float*> value_rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t turn = task / heads, head = task % heads, h = head / group;
      const int64_t t = turn % 2 == 0 ? turn / 2 : rows - 1 - turn / 2;
      const float* src = qkv_p + t * row_width + head * dim;
      const float* c = cos_p + pos_p[t] * half;
      const float* s = sin_p + pos_p[t] * half;
      for (int64_t i = 0; i < half; ++i) {  // the query, rotated and pre-scaled
        const float x0 = src[2 * i], x1 = src[2 * i + 1];
        q[2 * i] = (x0 * c[i] - x1 * s[i]) * fscale;
        q[2 * i + 1] = (x1 * c[i] + x0 * s[i]) * fscale;
      }
      const int64_t ctx = pos_p[t] + 1;
      const int64_t* table = table_p + seq_p[t] * width;
      const float* keys = k_p + h * head_stride;
      const float* values = v_p + h * head_stride;
      scores.resize(ctx);
      value_rows.resize(ctx);
      for (int64_t b0 = 0; b0 < ctx; b0 += block_size) {
        const int64_t first = table[b0 / block_size] * block_size * dim;
        for (int64_t p = b0, at = first; p < std::min(ctx, b0 + block_size); ++p, at += dim) {
          scores[p] = dot(q.data(), keys + at, dim);
          value_rows[p] = values + at;
        }
      }
      const float total = exp_shifted(scores.data(), ctx, *std::max_element(scores.begin(), scores.end()));
      weighted_sum(scores.data(), ctx, [&](int64_t p) { return value_rows[p]; }, dim, 1.f / total,
                   out_p + t * heads * dim + head * dim);
    }
  });
  return out;
}
