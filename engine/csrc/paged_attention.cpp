// Attention of one new token per sequence straight over the paged KV cache.
//
// The cache of one layer is heads-major, [2, kv_heads, slots, head_dim]
// (engine/kv_cache.py). Each (sequence, KV head) pair walks its own block
// table and reads the keys and values where they lie: nothing is gathered,
// nothing is padded to the longest sequence. The query heads that share a KV
// head are scored together, so every key and value is read once per KV head.
// Scores, the softmax and the weighted sum of values are float32 whatever the
// cache's dtype; the result is rounded once to the query's dtype.
//
// Built at first use by engine/paged_attention.py (torch.utils.cpp_extension), with -ffast-math so that
// the exponentials and the reductions vectorize.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// One cache value as float32, in a form the compiler vectorizes inside the dot and axpy loops, so a key
// or value row is widened in registers, never stored to a buffer and read back (that round trip was the
// kernel's largest stall: 1.3x at batch 8).
inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16); }
inline float widen(c10::Half x) { return static_cast<float>(x); }

// Ask for the cache lines of one row ahead of its use (blocks lie anywhere in the cache: fetching the next
// block while this one is computed made batch 32 1.6x faster).

template <typename T>
inline void prefetch_row(const T* row, int64_t dim) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < dim; i += kLine) __builtin_prefetch(row + i);
}

// Checked per sequence, rather than by reductions before the loop: a bad index must never read outside the
// cache, and the check costs nothing beside the keys it guards.
inline void check_sequence(int64_t b, int64_t len, const int64_t* table, int64_t max_blocks, int64_t block_size,
                           int64_t num_blocks) {
  TORCH_CHECK(len >= 1 && len <= max_blocks * block_size,
              "paged_decode_attention: context length ", len, " of sequence ", b, " is < 1 or beyond its table");
  for (int64_t j = 0; j < (len + block_size - 1) / block_size; ++j)  // the blocks the loops read
    TORCH_CHECK(table[j] >= 0 && table[j] < num_blocks,
                "paged_decode_attention: block ", table[j], " of sequence ", b, " is out of range");
}

// Softmax of `rows` rows of `len` scores in place, float32.
inline void softmax_rows(float* scores, int64_t rows, int64_t len) {
  for (int64_t g = 0; g < rows; ++g) {
    float* s = scores + g * len;
    float top = s[0];  // not -inf: built with -ffast-math, which assumes finite values
    for (int64_t t = 1; t < len; ++t) top = std::max(top, s[t]);
    float total = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      s[t] = std::exp(s[t] - top);
      total += s[t];
    }
    const float inv = 1.f / total;
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
}

// kDim: the head size as a compile-time constant (the common ones: the loops are unrolled and vectorized
// without remainders, 1.45x faster at 64 than with the size read at run time), or 0 for any other size.
template <typename T, int64_t kDim>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& layer_kv, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, int64_t block_size, double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1);
  const int64_t dim = kDim > 0 ? kDim : q.size(2);
  const int64_t kv_heads = layer_kv.size(1), slots = layer_kv.size(2);
  const int64_t group = heads / kv_heads, max_blocks = block_tables.size(1), num_blocks = slots / block_size;
  const T* qp = q.data_ptr<T>();
  const T* kp = layer_kv.data_ptr<T>();
  const T* vp = kp + kv_heads * slots * dim;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads;
      const int64_t len = lens[b];
      const int64_t* table = tables + b * max_blocks;
      check_sequence(b, len, table, max_blocks, block_size, num_blocks);
      for (int64_t g = 0; g < group; ++g) {  // the group's queries, float32
        const T* src = qp + (b * heads + h * group + g) * dim;
        for (int64_t i = 0; i < dim; ++i) qf[g * dim + i] = widen(src[i]);
      }
      scores.assign(group * len, 0.f);
      const T* kh = kp + h * slots * dim;
      const T* vh = vp + h * slots * dim;
      // Keys block by block: the slot of key t is table[t / block_size] * block_size + t % block_size, and
      // two 64-bit divisions per key cost more than its dot products.
      const int64_t used_blocks = (len + block_size - 1) / block_size;
      for (int64_t j = 0, t = 0; j < used_blocks; ++j) {
        const T* block_k = kh + table[j] * block_size * dim;
        const T* next_k = j + 1 < used_blocks ? kh + table[j + 1] * block_size * dim : block_k;
        for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
          prefetch_row(next_k + o * dim, dim);
          const T* __restrict r = block_k + o * dim;
          for (int64_t g = 0; g < group; ++g) {
            const float* __restrict qg = qf.data() + g * dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < dim; ++i) s += qg[i] * widen(r[i]);
            scores[g * len + t] = s * fscale;
          }
        }
      }
      softmax_rows(scores.data(), group, len);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0, t = 0; j < used_blocks; ++j) {
        const T* block_v = vh + table[j] * block_size * dim;
        const T* next_v = j + 1 < used_blocks ? vh + table[j + 1] * block_size * dim : block_v;
        for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
          prefetch_row(next_v + o * dim, dim);
          const T* __restrict r = block_v + o * dim;
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + t];
            float* __restrict a = acc.data() + g * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) a[i] += p * widen(r[i]);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = op + (b * heads + h * group + g) * dim;
        for (int64_t i = 0; i < dim; ++i) dst[i] = static_cast<T>(acc[g * dim + i]);
      }
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define SPLITSERVE_BF16_DECODE 1
// bfloat16 cache, head size 64, G query heads per KV head: the same attention with the per-key work in
// registers. Scores: two vdpbf16ps per key and query head (the bf16 products are exact in float32, summed in
// float32 as above, in another order), instead of widening the key row once per query head. Values: the row
// widened once and added into G x 4 float32 accumulators that stay in registers (the generic loop widened it
// per query head and kept the sums in memory). ~2x fewer instructions a key; the softmax is the generic one.
inline __m512 widen16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512bh load_bf16x32(const c10::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

template <int G>
void decode_attention_bf16_d64(const at::Tensor& q, const at::Tensor& layer_kv, const at::Tensor& block_tables,
                               const at::Tensor& context_lens, int64_t block_size, double scale, at::Tensor& out) {
  constexpr int64_t dim = 64;
  const int64_t batch = q.size(0), heads = q.size(1);
  const int64_t kv_heads = layer_kv.size(1), slots = layer_kv.size(2);
  const int64_t max_blocks = block_tables.size(1), num_blocks = slots / block_size;
  using T = c10::BFloat16;
  const T* qp = q.data_ptr<T>();
  const T* kp = layer_kv.data_ptr<T>();
  const T* vp = kp + kv_heads * slots * dim;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    float result[G][dim];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads;
      const int64_t len = lens[b];
      const int64_t* table = tables + b * max_blocks;
      check_sequence(b, len, table, max_blocks, block_size, num_blocks);
      const int64_t used_blocks = (len + block_size - 1) / block_size;
      __m512bh qv[G][2];
      for (int g = 0; g < G; ++g) {
        const T* src = qp + (b * heads + h * G + g) * dim;
        qv[g][0] = load_bf16x32(src);
        qv[g][1] = load_bf16x32(src + 32);
      }
      scores.resize(G * len);
      const T* kh = kp + h * slots * dim;
      const T* vh = vp + h * slots * dim;
      for (int64_t j = 0, t = 0; j < used_blocks; ++j) {
        const T* block_k = kh + table[j] * block_size * dim;
        const T* next_k = j + 1 < used_blocks ? kh + table[j + 1] * block_size * dim : block_k;
        for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
          prefetch_row(next_k + o * dim, dim);
          const __m512bh k0 = load_bf16x32(block_k + o * dim), k1 = load_bf16x32(block_k + o * dim + 32);
          for (int g = 0; g < G; ++g) {
            const __m512 d = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][0], k0), qv[g][1], k1);
            scores[g * len + t] = _mm512_reduce_add_ps(d) * fscale;
          }
        }
      }
      softmax_rows(scores.data(), G, len);
      __m512 acc[G][4];
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_setzero_ps();
      for (int64_t j = 0, t = 0; j < used_blocks; ++j) {
        const T* block_v = vh + table[j] * block_size * dim;
        const T* next_v = j + 1 < used_blocks ? vh + table[j + 1] * block_size * dim : block_v;
        for (int64_t o = 0; o < block_size && t < len; ++o, ++t) {
          prefetch_row(next_v + o * dim, dim);
          const T* r = block_v + o * dim;
          const __m512 v[4] = {widen16(r), widen16(r + 16), widen16(r + 32), widen16(r + 48)};
          for (int g = 0; g < G; ++g) {
            const __m512 p = _mm512_set1_ps(scores[g * len + t]);
            for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_fmadd_ps(p, v[i], acc[g][i]);
          }
        }
      }
      for (int g = 0; g < G; ++g) {
        for (int i = 0; i < 4; ++i) _mm512_storeu_ps(result[g] + 16 * i, acc[g][i]);
        T* dst = op + (b * heads + h * G + g) * dim;
        for (int64_t i = 0; i < dim; ++i) dst[i] = static_cast<T>(result[g][i]);
      }
    }
  });
}
#endif

// The register-resident bfloat16 path where it applies (head size 64, at most 4 query heads per KV head).
bool bf16_fast_path(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables, const at::Tensor& lens,
                    int64_t block_size, double scale, at::Tensor& out) {
#ifdef SPLITSERVE_BF16_DECODE
  if (q.scalar_type() != at::kBFloat16 || q.size(2) != 64) return false;
  switch (q.size(1) / kv.size(1)) {
    case 1: decode_attention_bf16_d64<1>(q, kv, tables, lens, block_size, scale, out); return true;
    case 2: decode_attention_bf16_d64<2>(q, kv, tables, lens, block_size, scale, out); return true;
    case 3: decode_attention_bf16_d64<3>(q, kv, tables, lens, block_size, scale, out); return true;
    case 4: decode_attention_bf16_d64<4>(q, kv, tables, lens, block_size, scale, out); return true;
    default: return false;
  }
#else
  return false;
#endif
}

template <typename T>
void by_head_size(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables, const at::Tensor& lens,
                  int64_t block_size, double scale, at::Tensor& out) {
  switch (q.size(2)) {
    case 64: decode_attention_impl<T, 64>(q, kv, tables, lens, block_size, scale, out); break;
    case 128: decode_attention_impl<T, 128>(q, kv, tables, lens, block_size, scale, out); break;
    default: decode_attention_impl<T, 0>(q, kv, tables, lens, block_size, scale, out);
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& layer_kv, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.device().is_cpu() && layer_kv.device().is_cpu(), "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && layer_kv.dim() == 4 && layer_kv.size(0) == 2,
              "paged_decode_attention: q [B, H, D] and layer_kv [2, KV, slots, D]");
  TORCH_CHECK(q.scalar_type() == layer_kv.scalar_type(), "paged_decode_attention: q and the cache differ in dtype");
  TORCH_CHECK(q.size(2) == layer_kv.size(3) && q.size(1) % layer_kv.size(1) == 0,
              "paged_decode_attention: head_dim differs or H is not a multiple of KV");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode_attention: int64 block tables and context lengths");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0),
              "paged_decode_attention: one block-table row and one length per sequence");
  TORCH_CHECK(layer_kv.size(2) % block_size == 0, "paged_decode_attention: slots not a multiple of block_size");
  auto qc = q.contiguous();
  auto kv = layer_kv.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(qc);
  switch (q.scalar_type()) {
    case at::kFloat: by_head_size<float>(qc, kv, tables, lens, block_size, scale, out); break;
    case at::kBFloat16:
      if (!bf16_fast_path(qc, kv, tables, lens, block_size, scale, out))
        by_head_size<c10::BFloat16>(qc, kv, tables, lens, block_size, scale, out);
      break;
    case at::kHalf: by_head_size<c10::Half>(qc, kv, tables, lens, block_size, scale, out); break;
    default: TORCH_CHECK(false, "paged_decode_attention: float32, bfloat16 or float16 only");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(splitserve_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor layer_kv, Tensor block_tables, Tensor context_lens, "
        "int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
