// GEMMs over GGUF's block-quantized weights (see block_quant.py): Q4_1 (4-bit values, a scale and
// a minimum per group of 32, which also holds Q4_0) and Q8_0 (8-bit values, a scale per group).
//
// llama.cpp's scheme: the weights stay in their blocks, the activations are quantized per row
// and group of 32 to int8 (Q8_1, `quantize_rows`), and each group's product is an exact integer
// dot product (AVX2 maddubs) scaled by the two groups' scales; four output columns at a time,
// each group of weights unpacked once for two rows.
//
// Batch invariance: a row's activations are quantized on their own and every (row, column)
// result adds its terms in one order whatever the number of rows beside it, so a sequence's
// logits do not change with the requests batched with it (fbgemm's dynamic int8, with one
// activation scale per step, does not have that property).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 32;   // values per block (GGUF's QK4_1 and QK8_0)
constexpr int64_t kTileN = 4;    // output columns computed together
constexpr int64_t kChunkM = 64;  // rows per pass over a tile (they stay in L2 across the tiles)

// One group of 32 Q4_1 values: byte j holds value j (low nibble) and value j + 16 (high nibble).
inline void dequant_q4_group(const uint8_t* q, float d, float m, float* out) {
#ifdef __AVX2__
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
  auto put = [&](__m128i eight, float* dst) {
    _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight)), vd, vm));
  };
  put(lo, out);
  put(_mm_srli_si128(lo, 8), out + 8);
  put(hi, out + 16);
  put(_mm_srli_si128(hi, 8), out + 24);
#else
  for (int j = 0; j < 16; ++j) {
    out[j] = static_cast<float>(q[j] & 0x0F) * d + m;
    out[j + 16] = static_cast<float>(q[j] >> 4) * d + m;
  }
#endif
}

inline void dequant_q8_group(const int8_t* q, float d, float* out) {
#ifdef __AVX2__
  const __m256 vd = _mm256_set1_ps(d);
  for (int j = 0; j < 32; j += 8) {
    const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), vd));
  }
#else
  for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(q[j]) * d;
#endif
}

// The float32 values of row n of a block-quantized matrix (K values).
struct BlockMatrix {
  const uint8_t* q4 = nullptr;  // [N, K / 2] (Q4_1)
  const int8_t* q8 = nullptr;   // [N, K] (Q8_0)
  const float* scales;          // [N, K / 32]
  const float* mins = nullptr;  // [N, K / 32] (Q4_1)
  int64_t n, k;

  void dequant_row(int64_t row, float* out) const {
    const int64_t groups = k / kGroup;
    const float* d = scales + row * groups;
    if (q4 != nullptr) {
      const uint8_t* q = q4 + row * (k / 2);
      const float* m = mins + row * groups;
      for (int64_t g = 0; g < groups; ++g) dequant_q4_group(q + g * 16, d[g], m[g], out + g * kGroup);
    } else {
      const int8_t* q = q8 + row * k;
      for (int64_t g = 0; g < groups; ++g) dequant_q8_group(q + g * kGroup, d[g], out + g * kGroup);
    }
  }
};

// Activations quantized per group of 32, as llama.cpp's Q8_1: q = round(x / d) with
// d = max |x| / 127, and s = d * sum(q) (what a Q4_1 minimum multiplies). Per row, so a row's
// values never depend on the rows beside it.
struct QuantizedRows {
  std::vector<int8_t> q;  // [rows, k]
  std::vector<float> d, s;  // [rows, k / 32]
  int64_t k;
};

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t groups = k / kGroup;
  QuantizedRows out{std::vector<int8_t>(rows * k), std::vector<float>(rows * groups), std::vector<float>(rows * groups), k};
  at::parallel_for(0, rows * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* v = x + i * kGroup;  // group i of the flat [rows, k] matrix
      float amax = 0.f;
      for (int j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int8_t* q = out.q.data() + i * kGroup;
      for (int j = 0; j < kGroup; ++j) {
        const int value = static_cast<int>(std::nearbyint(v[j] * inv));
        q[j] = static_cast<int8_t>(value);
        sum += value;
      }
      out.d[i] = d;
      out.s[i] = d * static_cast<float>(sum);
    }
  });
  return out;
}

#ifdef __AVX2__
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 values of group g of weight row n as unsigned bytes in the group's order (Q4_1: the
// 4-bit values; Q8_0: |q|, with `sign` set to q, whose signs move onto the activations).
template <bool Q4>
inline __m256i weight_group(const BlockMatrix& w, int64_t n, int64_t g, __m256i& sign) {
  if (Q4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q4 + n * (w.k / 2) + g * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
  }
  sign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q8 + n * w.k + g * kGroup));
  return _mm256_abs_epi8(sign);
}
#endif

// y[r][c] for R rows from r0 and the columns n0 .. n0 + cols (a tile past the last column
// repeats it and drops the copies). Per (row, column) the terms are added in one order whatever
// R is: per group, the exact integer dot product times d_w * d_x into eight float lanes, the
// lanes summed in a fixed order, then the minimums' terms.
template <int R, bool Q4>
void tile_dots(const QuantizedRows& x, int64_t r0, const BlockMatrix& w, int64_t n0, int64_t cols, float* y,
               int64_t ldy) {
  const int64_t k = x.k, groups = k / kGroup;
  int64_t col[kTileN];
  for (int c = 0; c < kTileN; ++c) col[c] = n0 + std::min<int64_t>(c, cols - 1);
  float minimum_terms[R][kTileN] = {};
  if (Q4)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kTileN; ++c) {
        const float* m = w.mins + col[c] * groups;
        const float* s = x.s.data() + (r0 + r) * groups;
        float total = 0.f;
        for (int64_t g = 0; g < groups; ++g) total += m[g] * s[g];
        minimum_terms[r][c] = total;
      }
  float result[R][kTileN];
#ifdef __AVX2__
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][kTileN];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kTileN; ++c) acc[r][c] = _mm256_setzero_ps();
  const float* scales[kTileN];
  for (int c = 0; c < kTileN; ++c) scales[c] = w.scales + col[c] * groups;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i wv[kTileN], sv[kTileN];
    for (int c = 0; c < kTileN; ++c) wv[c] = weight_group<Q4>(w, col[c], g, sv[c]);
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r;
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + row * k + g * kGroup));
      const float dx = x.d[row * groups + g];
      for (int c = 0; c < kTileN; ++c) {
        const __m256i xs = Q4 ? xv : _mm256_sign_epi8(xv, sv[c]);
        const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(wv[c], xs), ones);
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scales[c][g] * dx), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kTileN; ++c) result[r][c] = hsum(acc[r][c]) + minimum_terms[r][c];
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kTileN; ++c) {
      const int64_t row = r0 + r, n = col[c];
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int isum = 0;
        for (int j = 0; j < kGroup; ++j) {
          const int value = !Q4 ? w.q8[n * k + g * kGroup + j]
                          : j < 16 ? w.q4[n * (k / 2) + g * 16 + j] & 0x0F
                                   : w.q4[n * (k / 2) + g * 16 + j - 16] >> 4;
          isum += value * x.q[row * k + g * kGroup + j];
        }
        total += static_cast<float>(isum) * (w.scales[n * groups + g] * x.d[row * groups + g]);
      }
      result[r][c] = total + minimum_terms[r][c];
    }
#endif
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < cols; ++c) y[r * ldy + c] = result[r][c];
}

template <bool Q4>
void rows_times_tiles(const QuantizedRows& xq, const BlockMatrix& w, float* yp, int64_t rows, int64_t begin,
                      int64_t end) {
  const int64_t n = w.n;
  for (int64_t m0 = 0; m0 < rows; m0 += kChunkM) {
    const int64_t m1 = std::min(rows, m0 + kChunkM);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kTileN, cols = std::min(kTileN, n - n0);
      int64_t r = m0;
      for (; r + 2 <= m1; r += 2) tile_dots<2, Q4>(xq, r, w, n0, cols, yp + r * n + n0, n);
      if (r < m1) tile_dots<1, Q4>(xq, r, w, n0, cols, yp + r * n + n0, n);
    }
  }
}

torch::Tensor block_linear(const torch::Tensor& x, const BlockMatrix& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [rows, in_features] tensor");
  TORCH_CHECK(x.size(1) == w.k, "x has ", x.size(1), " features, the weights take ", w.k);
  const int64_t rows = x.size(0), n = w.n;
  auto y = torch::empty({rows, n}, x.options());
  float* yp = y.data_ptr<float>();
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), rows, w.k);
  const int64_t tiles = (n + kTileN - 1) / kTileN;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    if (w.q4 != nullptr) {
      rows_times_tiles<true>(xq, w, yp, rows, begin, end);
    } else {
      rows_times_tiles<false>(xq, w, yp, rows, begin, end);
    }
  });
  if (bias.has_value()) y.add_(bias.value());
  return y;
}

void check_blocks(const torch::Tensor& scales, int64_t n, int64_t k) {
  TORCH_CHECK(k % kGroup == 0, "in_features must be a multiple of 32, got ", k);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == n && scales.size(1) == k / kGroup,
              "scales must be contiguous float32 [out_features, in_features / 32]");
}

BlockMatrix q4_matrix(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& mins) {
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.is_contiguous() && q.dim() == 2,
              "q4 weights must be contiguous uint8 [out_features, in_features / 2]");
  const int64_t n = q.size(0), k = q.size(1) * 2;
  check_blocks(scales, n, k);
  TORCH_CHECK(mins.sizes() == scales.sizes() && mins.scalar_type() == torch::kFloat32 && mins.is_contiguous(),
              "mins must be like scales");
  BlockMatrix w;
  w.q4 = q.data_ptr<uint8_t>();
  w.scales = scales.data_ptr<float>();
  w.mins = mins.data_ptr<float>();
  w.n = n;
  w.k = k;
  return w;
}

BlockMatrix q8_matrix(const torch::Tensor& q, const torch::Tensor& scales) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.dim() == 2,
              "q8 weights must be contiguous int8 [out_features, in_features]");
  const int64_t n = q.size(0), k = q.size(1);
  check_blocks(scales, n, k);
  BlockMatrix w;
  w.q8 = q.data_ptr<int8_t>();
  w.scales = scales.data_ptr<float>();
  w.n = n;
  w.k = k;
  return w;
}

torch::Tensor gather_rows(const BlockMatrix& w, const torch::Tensor& ids) {
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1, "ids must be a 1-d int64 tensor");
  auto idx = ids.contiguous();
  const int64_t count = idx.size(0);
  auto out = torch::empty({count, w.k}, torch::dtype(torch::kFloat32));
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < w.n, "token id ", ip[i], " is outside the vocabulary [0, ", w.n, ")");
  float* op = out.data_ptr<float>();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) w.dequant_row(ip[i], op + i * w.k);
  });
  return out;
}

}  // namespace

// q4_linear(x [M, K], q [N, K/2] uint8, scales [N, K/32], mins [N, K/32], bias [N]?) -> [M, N]
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        const torch::Tensor& mins, const c10::optional<torch::Tensor>& bias) {
  return block_linear(x, q4_matrix(q, scales, mins), bias);
}

// q8_linear(x [M, K], q [N, K] int8, scales [N, K/32], bias [N]?) -> [M, N]
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& bias) {
  return block_linear(x, q8_matrix(q, scales), bias);
}

// The float32 rows `ids` of a block-quantized matrix (an embedding lookup).
torch::Tensor q4_rows(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& mins,
                      const torch::Tensor& ids) {
  return gather_rows(q4_matrix(q, scales, mins), ids);
}

torch::Tensor q8_rows(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& ids) {
  return gather_rows(q8_matrix(q, scales), ids);
}
