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

// q . k in eight interleaved partial sums (the compiler vectorizes them; one fixed order).
inline float dot(const float* q, const float* k, int64_t n) {
  float part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += q[i + j] * k[i + j];
  float sum = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  for (; i < n; ++i) sum += q[i] * k[i];
  return sum;
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

  // Pass 2: attention, one (row, kv head) per task, its query heads together.
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * dim), scores, acc(group * dim), total(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / kv_heads, h = task % kv_heads;
      const float* row = qkv_p + t * row_width;
      const float* c = cos_p + pos_p[t] * half;
      const float* s = sin_p + pos_p[t] * half;
      for (int64_t g = 0; g < group; ++g) {  // the group's query heads, rotated and pre-scaled
        const float* src = row + (h * group + g) * dim;
        float* dst = q.data() + g * dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = src[2 * i], x1 = src[2 * i + 1];
          dst[2 * i] = (x0 * c[i] - x1 * s[i]) * fscale;
          dst[2 * i + 1] = (x1 * c[i] + x0 * s[i]) * fscale;
        }
      }
      const int64_t ctx = pos_p[t] + 1;
      const int64_t* table = table_p + seq_p[t] * width;
      scores.resize(group * ctx);
      for (int64_t p = 0; p < ctx; ++p) {
        const float* key = k_p + h * head_stride + (table[p / block_size] * block_size + p % block_size) * dim;
        for (int64_t g = 0; g < group; ++g) scores[g * ctx + p] = dot(q.data() + g * dim, key, dim);
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * ctx;
        const float top = *std::max_element(sg, sg + ctx);
        float sum = 0.f;
        for (int64_t p = 0; p < ctx; ++p) {
          sg[p] = std::exp(sg[p] - top);
          sum += sg[p];
        }
        total[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < ctx; ++p) {
        const float* value = v_p + h * head_stride + (table[p / block_size] * block_size + p % block_size) * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * ctx + p];
          float* a = acc.data() + g * dim;
          for (int64_t i = 0; i < dim; ++i) a[i] += w * value[i];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = out_p + t * heads * dim + (h * group + g) * dim;
        const float inv = 1.f / total[g];
        for (int64_t i = 0; i < dim; ++i) o[i] = acc[g * dim + i] * inv;
      }
    }
  });
  return out;
}
