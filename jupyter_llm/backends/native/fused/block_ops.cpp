// GEMMs over GGUF's block-quantized weights (see block_quant.py): Q4_1 (4-bit values, a scale and
// a minimum per group of 32, which also holds Q4_0) and Q8_0 (8-bit values, a scale per group).
//
// llama.cpp's scheme: the weights stay in their blocks, the activations are quantized per row
// and group of 32 to int8 (Q8_1, `quantize_rows`), and each group's product is an exact integer
// dot product (AVX2 maddubs) scaled by the two groups' scales.
//
// The packed layout (block_quant.PackedBlocks): output columns in tiles of four, a row's groups
// padded to an even count. Per group a tile holds its four columns' values side by side (Q4_1:
// 4 x 16 bytes of nibbles, byte j holding value j low and value j + 16 high; Q8_0: 4 x 32
// bytes), so that one 32-byte load feeds two columns (Q4_1) or one, and the integer sums of four
// columns and two groups land in one vector of eight lanes (`lane` says which) after a few exact
// integer additions. Per pair of groups the tile's eight scales (and Q4_1's minimums) are
// float16 in that lane order, the values GGUF stores: a pair of groups costs one conversion and
// one FMA for all four columns, where a column at a time costs them per column and group.
//
// Batch invariance: a row's activations are quantized on their own and every (row, column)
// result adds its terms in one order whatever the number of rows beside it, so a sequence's
// logits do not change with the requests batched with it (fbgemm's dynamic int8, with one
// activation scale per step, does not have that property).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 32;   // values per block (GGUF's QK4_1 and QK8_0)
constexpr int64_t kTileN = 4;    // output columns per tile
constexpr int64_t kChunkM = 64;  // rows per pass over a tile (they stay in L2 across the tiles)

// The lane of column c (0-3) and group parity e (0, 1) in a pair's vector of eight sums, in the
// order the AVX2 reductions below produce: Q4_1 [c0 c2 c0' c2' c1 c3 c1' c3'] (' = odd group),
// Q8_0 [c0 c1 c2 c3 c0' c1' c2' c3']. block_quant.py lays the scales out by the same rule.
template <bool Q4>
constexpr int lane(int c, int e) {
  return Q4 ? (c & 1) * 4 + e * 2 + (c >> 1) : e * 4 + c;
}

inline float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

// A block-quantized [n, k] matrix in the packed layout.
struct PackedMatrix {
  bool q4;
  const uint8_t* q;          // [tiles, groups * 4 * bytes_per_group]
  const uint16_t* scales;    // [tiles, groups / 2 * 8] float16 bits, lane order
  const uint16_t* mins;      // like scales (Q4_1), else nullptr
  int64_t n, k, groups;      // columns, in features, groups per row (padded to even)

  int64_t group_bytes() const { return q4 ? kGroup / 2 : kGroup; }
  int64_t tile_bytes() const { return groups * kTileN * group_bytes(); }
  int64_t tiles() const { return (n + kTileN - 1) / kTileN; }

  // The float32 values of row `row` (one column of W.T), k of them.
  void dequant_row(int64_t row, float* out) const {
    const int64_t t = row / kTileN;
    const int c = static_cast<int>(row % kTileN);
    for (int64_t g = 0; g < k / kGroup; ++g) {
      const int64_t at = t * groups * 4 + (g / 2) * 8 + (q4 ? lane<true>(c, g % 2) : lane<false>(c, g % 2));
      const float d = half_to_float(scales[at]);
      const uint8_t* values = q + t * tile_bytes() + (g * kTileN + c) * group_bytes();
      float* o = out + g * kGroup;
      if (q4) {
        const float m = half_to_float(mins[at]);
        for (int j = 0; j < 16; ++j) {
          o[j] = static_cast<float>(values[j] & 0x0F) * d + m;
          o[j + 16] = static_cast<float>(values[j] >> 4) * d + m;
        }
      } else {
        for (int j = 0; j < kGroup; ++j) o[j] = static_cast<float>(static_cast<int8_t>(values[j])) * d;
      }
    }
  }
};

// Activations quantized per group of 32, as llama.cpp's Q8_1: q = round(x / d) with
// d = max |x| / 127, and s = d * sum(q) (what a Q4_1 minimum multiplies). Per row, so a row's
// values never depend on the rows beside it. The groups are padded to the weights' even count
// (zeros, d = s = 0), and d and s are also laid out per pair of groups in the weights' lane
// order (`d_lanes`, `s_lanes`: [rows, groups / 2, 8]).
struct QuantizedRows {
  std::vector<int8_t> q;                // [rows, groups * 32]
  std::vector<float> d_lanes, s_lanes;  // [rows, groups / 2 * 8]
  int64_t width, groups;
};

template <bool Q4>
QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t k, int64_t groups) {
  const int64_t real = k / kGroup, width = groups * kGroup, pairs = groups / 2;
  QuantizedRows out{std::vector<int8_t>(rows * width, 0), std::vector<float>(rows * pairs * 8, 0.f),
                    std::vector<float>(rows * pairs * 8, 0.f), width, groups};
  at::parallel_for(0, rows * real, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / real, g = i % real;
      const float* v = x + row * k + g * kGroup;
      float amax = 0.f;
      for (int j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int8_t* q = out.q.data() + row * width + g * kGroup;
      for (int j = 0; j < kGroup; ++j) {
        const int value = static_cast<int>(std::nearbyint(v[j] * inv));
        q[j] = static_cast<int8_t>(value);
        sum += value;
      }
      const float s = d * static_cast<float>(sum);
      float* dl = out.d_lanes.data() + (row * pairs + g / 2) * 8;
      float* sl = out.s_lanes.data() + (row * pairs + g / 2) * 8;
      for (int c = 0; c < kTileN; ++c) {
        const int l = lane<Q4>(c, static_cast<int>(g % 2));
        dl[l] = d;
        sl[l] = s;
      }
    }
  });
  return out;
}

#ifdef __AVX2__
// The integer sums of one group and the tile's four columns, before the pair is combined.
// Q4_1: int16 [c0 x4, c2 x4 | c1 x4, c3 x4] (four partial sums each, <= 8 * 15 * 127 = 15,240:
// exact); Q8_0: int32 [c0 c1 c2 c3 | c0 c1 c2 c3] (the group's first and second sixteen values).
inline __m256i q4_group_sums(__m256i lo01, __m256i hi01, __m256i lo23, __m256i hi23, const int8_t* x) {
  const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  const __m256i xhi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16)));
  const __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(lo01, xlo), _mm256_maddubs_epi16(hi01, xhi));
  const __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(lo23, xlo), _mm256_maddubs_epi16(hi23, xhi));
  return _mm256_hadd_epi16(s01, s23);
}

// A Q4_1 pair's eight int32 sums in lane order from its groups' int16 partial sums: one more
// int16 level (<= 16 * 15 * 127 = 30,480: still exact), then one madd. Integer additions in
// place of multiplies: Zen's one vector multiply port bounds these kernels.
inline __m256i q4_pair_sums(__m256i even, __m256i odd) {
  return _mm256_madd_epi16(_mm256_hadd_epi16(even, odd), _mm256_set1_epi16(1));
}

inline __m256i q8_column_sums(__m256i w, __m256i x) {
  // maddubs takes one unsigned operand: |w|, with w's signs moved onto x.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)),
                           _mm256_set1_epi16(1));
}

inline __m256 load_halves(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// y[r][c] for R rows from r0 and tile t's columns (`cols` of them are real). Per (row, column)
// the terms are added in one order whatever R is: per pair of groups, the exact integer sums
// times d_w * d_x into one lane (and Q4_1's minimum times s_x into another), the two lanes of
// the column added at the end.
template <int R, bool Q4>
void tile_dots(const QuantizedRows& x, int64_t r0, const PackedMatrix& w, int64_t t, int64_t cols, float* y,
               int64_t ldy) {
  const int64_t pairs = w.groups / 2, width = x.width;
  const uint8_t* wq = w.q + t * w.tile_bytes();
  const uint16_t* ws = w.scales + t * pairs * 8;
  const uint16_t* wm = Q4 ? w.mins + t * pairs * 8 : nullptr;
  float total[R][8];
#ifdef __AVX2__
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 acc[R], acc_min[R];
  for (int r = 0; r < R; ++r) acc[r] = acc_min[r] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256 scale = load_halves(ws + p * 8);
    const __m256 minimum = Q4 ? load_halves(wm + p * 8) : _mm256_setzero_ps();
    __m256i first[R];  // the even group's sums, until the odd group's join them
    for (int e = 0; e < 2; ++e) {
      const int64_t g = 2 * p + e;
      __m256i wv[kTileN];
      if (Q4) {
        const uint8_t* wg = wq + g * 64;
        const __m256i v01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg));
        const __m256i v23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32));
        wv[0] = _mm256_and_si256(v01, mask), wv[1] = _mm256_and_si256(_mm256_srli_epi16(v01, 4), mask);
        wv[2] = _mm256_and_si256(v23, mask), wv[3] = _mm256_and_si256(_mm256_srli_epi16(v23, 4), mask);
      } else {
        const uint8_t* wg = wq + g * 128;
        for (int c = 0; c < kTileN; ++c) wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * 32));
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* xg = x.q.data() + (r0 + r) * width + g * kGroup;
        __m256i sums;
        if (Q4) {
          sums = q4_group_sums(wv[0], wv[1], wv[2], wv[3], xg);
        } else {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg));
          sums = _mm256_hadd_epi32(_mm256_hadd_epi32(q8_column_sums(wv[0], xv), q8_column_sums(wv[1], xv)),
                                   _mm256_hadd_epi32(q8_column_sums(wv[2], xv), q8_column_sums(wv[3], xv)));
        }
        if (e == 0) {
          first[r] = sums;
          continue;
        }
        const int64_t at = ((r0 + r) * pairs + p) * 8;
        const __m256i pair = Q4 ? q4_pair_sums(first[r], sums)
                                : _mm256_add_epi32(_mm256_permute2x128_si256(first[r], sums, 0x20),
                                                   _mm256_permute2x128_si256(first[r], sums, 0x31));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair),
                                 _mm256_mul_ps(scale, _mm256_loadu_ps(x.d_lanes.data() + at)), acc[r]);
        if (Q4) acc_min[r] = _mm256_fmadd_ps(minimum, _mm256_loadu_ps(x.s_lanes.data() + at), acc_min[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(total[r], _mm256_add_ps(acc[r], acc_min[r]));
#else
  // The same arithmetic lane by lane (std::fma as the AVX2 path's FMA).
  float acc[R][8] = {}, acc_min[R][8] = {};
  for (int64_t p = 0; p < pairs; ++p)
    for (int r = 0; r < R; ++r) {
      const int64_t at = ((r0 + r) * pairs + p) * 8;
      for (int e = 0; e < 2; ++e) {
        const int64_t g = 2 * p + e;
        const int8_t* xg = x.q.data() + (r0 + r) * width + g * kGroup;
        for (int c = 0; c < kTileN; ++c) {
          const uint8_t* wg = wq + (g * kTileN + c) * w.group_bytes();
          int sum = 0;
          for (int j = 0; j < kGroup; ++j) {
            const int value = !Q4 ? static_cast<int8_t>(wg[j]) : j < 16 ? wg[j] & 0x0F : wg[j - 16] >> 4;
            sum += value * xg[j];
          }
          const int l = lane<Q4>(c, e);
          acc[r][l] = std::fma(static_cast<float>(sum), half_to_float(ws[p * 8 + l]) * x.d_lanes[at + l], acc[r][l]);
          if (Q4) acc_min[r][l] = std::fma(half_to_float(wm[p * 8 + l]), x.s_lanes[at + l], acc_min[r][l]);
        }
      }
    }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < 8; ++l) total[r][l] = acc[r][l] + acc_min[r][l];
#endif
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) y[r * ldy + c] = total[r][lane<Q4>(c, 0)] + total[r][lane<Q4>(c, 1)];
}

template <bool Q4>
torch::Tensor packed_linear(const torch::Tensor& x, const PackedMatrix& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [rows, in_features] tensor");
  TORCH_CHECK(x.size(1) == w.k, "x has ", x.size(1), " features, the weights take ", w.k);
  const int64_t rows = x.size(0), n = w.n;
  auto y = torch::empty({rows, n}, x.options());
  float* yp = y.data_ptr<float>();
  const QuantizedRows xq = quantize_rows<Q4>(x.data_ptr<float>(), rows, w.k, w.groups);
  at::parallel_for(0, w.tiles(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < rows; m0 += kChunkM) {
      const int64_t m1 = std::min(rows, m0 + kChunkM);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t cols = std::min(kTileN, n - t * kTileN);
        float* out = yp + t * kTileN;
        int64_t r = m0;
        for (; r + 4 <= m1; r += 4) tile_dots<4, Q4>(xq, r, w, t, cols, out + r * n, n);
        if (r + 2 <= m1) tile_dots<2, Q4>(xq, r, w, t, cols, out + r * n, n), r += 2;
        if (r < m1) tile_dots<1, Q4>(xq, r, w, t, cols, out + r * n, n);
      }
    }
  });
  if (bias.has_value()) y.add_(bias.value());
  return y;
}

PackedMatrix packed_matrix(bool q4, const torch::Tensor& q, const torch::Tensor& scales,
                           const c10::optional<torch::Tensor>& mins, int64_t n, int64_t k) {
  TORCH_CHECK(k > 0 && k % kGroup == 0, "in_features must be a positive multiple of 32, got ", k);
  const int64_t groups = (k / kGroup + 1) / 2 * 2, tiles = (n + kTileN - 1) / kTileN;
  const int64_t bytes = groups * kTileN * (q4 ? kGroup / 2 : kGroup);
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.is_contiguous() && q.dim() == 2 && q.size(0) == tiles &&
                  q.size(1) == bytes,
              "packed weights must be contiguous uint8 [", tiles, ", ", bytes, "] (block_quant.PackedBlocks)");
  auto check_lanes = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == torch::kHalf && t.is_contiguous() && t.dim() == 2 && t.size(0) == tiles &&
                    t.size(1) == groups * 4,
                "packed ", name, " must be contiguous float16 [", tiles, ", ", groups * 4, "]");
  };
  check_lanes(scales, "scales");
  PackedMatrix w{q4, q.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                 nullptr, n, k, groups};
  if (q4) {
    TORCH_CHECK(mins.has_value(), "Q4_1 weights need their minimums");
    check_lanes(mins.value(), "mins");
    w.mins = reinterpret_cast<const uint16_t*>(mins.value().data_ptr<at::Half>());
  }
  return w;
}

torch::Tensor gather_rows(const PackedMatrix& w, const torch::Tensor& ids) {
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

// q4_linear(x [M, K], q, scales, mins (block_quant.PackedBlocks), N, K, bias [N]?) -> [M, N]
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        const torch::Tensor& mins, int64_t out_features, int64_t in_features,
                        const c10::optional<torch::Tensor>& bias) {
  return packed_linear<true>(x, packed_matrix(true, q, scales, mins, out_features, in_features), bias);
}

// q8_linear(x [M, K], q, scales (block_quant.PackedBlocks), N, K, bias [N]?) -> [M, N]
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                        int64_t out_features, int64_t in_features, const c10::optional<torch::Tensor>& bias) {
  return packed_linear<false>(x, packed_matrix(false, q, scales, c10::nullopt, out_features, in_features), bias);
}

// The float32 rows `ids` of a packed block matrix [N, K] (an embedding lookup).
torch::Tensor q4_rows(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& mins,
                      int64_t out_features, int64_t in_features, const torch::Tensor& ids) {
  return gather_rows(packed_matrix(true, q, scales, mins, out_features, in_features), ids);
}

torch::Tensor q8_rows(const torch::Tensor& q, const torch::Tensor& scales, int64_t out_features, int64_t in_features,
                      const torch::Tensor& ids) {
  return gather_rows(packed_matrix(false, q, scales, c10::nullopt, out_features, in_features), ids);
}
