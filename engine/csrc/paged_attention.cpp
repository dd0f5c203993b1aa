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

// exp(score - row max) of `rows` rows of `len` scores in place, float32; each row's max and sum of
// exponentials into `top` and `total` (the softmax's numerator and denominator).
inline void exp_rows(float* scores, int64_t rows, int64_t len, float* top, float* total) {
  for (int64_t g = 0; g < rows; ++g) {
    float* s = scores + g * len;
    float m = s[0];  // not -inf: built with -ffast-math, which assumes finite values
    for (int64_t t = 1; t < len; ++t) m = std::max(m, s[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    top[g] = m;
    total[g] = sum;
  }
}

// Softmax of `rows` rows of `len` scores in place, float32.
inline void softmax_rows(float* scores, int64_t rows, int64_t len) {
  std::vector<float> top(rows), total(rows);
  exp_rows(scores, rows, len, top.data(), total.data());
  for (int64_t g = 0; g < rows; ++g) {
    float* s = scores + g * len;
    const float inv = 1.f / total[g];
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

// One (sequence, KV head)'s keys [t0, t1) for its G query heads: the row max and sum of exp(score - max)
// per query head, and the values weighted by those exponentials (not yet divided by the sum), so that
// partial results over several key ranges combine exactly as a softmax over all of them.
template <int G>
struct KeyRangeResult {
  float top[G];
  float total[G];
  float acc[G][64];
};

template <int G>
void attend_key_range(const __m512bh (&qv)[G][2], const c10::BFloat16* kh, const c10::BFloat16* vh,
                      const int64_t* table, int64_t block_size, int64_t t0, int64_t t1, float fscale,
                      std::vector<float>& scores, KeyRangeResult<G>& out) {
  using T = c10::BFloat16;
  constexpr int64_t dim = 64;
  const int64_t len = t1 - t0;
  scores.resize(G * len);
  // Keys block by block: the slot of key t is table[t / block_size] * block_size + t % block_size, and
  // two 64-bit divisions per key cost more than its dot products.
  for (int64_t t = t0; t < t1;) {
    const int64_t j = t / block_size, last_block = (t1 - 1) / block_size;
    const T* block_k = kh + table[j] * block_size * dim;
    const T* next_k = j < last_block ? kh + table[j + 1] * block_size * dim : block_k;
    for (int64_t o = t % block_size; o < block_size && t < t1; ++o, ++t) {
      prefetch_row(next_k + o * dim, dim);
      const __m512bh k0 = load_bf16x32(block_k + o * dim), k1 = load_bf16x32(block_k + o * dim + 32);
      for (int g = 0; g < G; ++g) {
        const __m512 d = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][0], k0), qv[g][1], k1);
        scores[g * len + (t - t0)] = _mm512_reduce_add_ps(d) * fscale;
      }
    }
  }
  exp_rows(scores.data(), G, len, out.top, out.total);
  __m512 acc[G][4];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int64_t t = t0; t < t1;) {
    const int64_t j = t / block_size, last_block = (t1 - 1) / block_size;
    const T* block_v = vh + table[j] * block_size * dim;
    const T* next_v = j < last_block ? vh + table[j + 1] * block_size * dim : block_v;
    for (int64_t o = t % block_size; o < block_size && t < t1; ++o, ++t) {
      prefetch_row(next_v + o * dim, dim);
      const T* r = block_v + o * dim;
      const __m512 v[4] = {widen16(r), widen16(r + 16), widen16(r + 32), widen16(r + 48)};
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * len + (t - t0)]);
        for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_fmadd_ps(p, v[i], acc[g][i]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out.acc[g] + 16 * i, acc[g][i]);
}

// The G output rows of one (sequence, KV head) from its parts' results: exp(top_s - top) rescales each part
// to the overall max, then the weighted values are divided by the softmax's sum and rounded once.
template <int G>
void store_pair(const KeyRangeResult<G>* r, int64_t splits, c10::BFloat16* dst) {
  constexpr int64_t dim = 64;
  for (int g = 0; g < G; ++g) {
    float top = r[0].top[g];  // part 0 always has keys (a context length is >= 1)
    for (int64_t s = 1; s < splits; ++s)
      if (r[s].total[g] > 0.f) top = std::max(top, r[s].top[g]);
    float result[dim] = {};
    float total = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      if (r[s].total[g] == 0.f) continue;  // a part past a short sequence's end
      const float w = s == 0 && top == r[0].top[g] ? 1.f : std::exp(r[s].top[g] - top);
      total += w * r[s].total[g];
      for (int64_t i = 0; i < dim; ++i) result[i] += w * r[s].acc[g][i];
    }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < dim; ++i) dst[g * dim + i] = static_cast<c10::BFloat16>(result[i] * inv);
  }
}

// How many key ranges each (sequence, KV head) is split into: with fewer pairs than twice the threads (batch
// 1: 3 pairs on 2 threads, one thread did two and the other one) the keys are divided too, so that every
// thread reads about as much of the cache; ranges are whole blocks, at least 4 of them each.
inline int64_t key_splits(int64_t pairs, int64_t max_len, int64_t block_size) {
  const int64_t threads = at::get_num_threads();
  if (pairs >= 2 * threads) return 1;
  const int64_t wanted = (2 * threads + pairs - 1) / pairs;
  const int64_t blocks = (max_len + block_size - 1) / block_size;
  return std::max<int64_t>(1, std::min(wanted, blocks / 4));
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
  for (int64_t b = 0; b < batch; ++b)  // before any thread reads: a bad table never reaches the loops
    check_sequence(b, lens[b], tables + b * max_blocks, max_blocks, block_size, num_blocks);
  const int64_t pairs = batch * kv_heads;
  const int64_t splits = key_splits(pairs, *std::max_element(lens, lens + batch), block_size);
  std::vector<KeyRangeResult<G>> parts(pairs * splits);

  at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / splits, part = item % splits;
      const int64_t b = pair / kv_heads, h = pair % kv_heads;
      const int64_t len = lens[b];
      // This part's keys: a share of the sequence's blocks (the last parts of a short sequence get none).
      const int64_t per_part = ((len + block_size - 1) / block_size + splits - 1) / splits * block_size;
      const int64_t t0 = std::min(len, part * per_part), t1 = std::min(len, t0 + per_part);
      KeyRangeResult<G>& r = parts[item];
      if (t0 == t1) {
        for (int g = 0; g < G; ++g) r.total[g] = 0.f;
        continue;
      }
      __m512bh qv[G][2];
      for (int g = 0; g < G; ++g) {
        const T* src = qp + (b * heads + h * G + g) * dim;
        qv[g][0] = load_bf16x32(src);
        qv[g][1] = load_bf16x32(src + 32);
      }
      attend_key_range<G>(qv, kp + h * slots * dim, vp + h * slots * dim, tables + b * max_blocks, block_size, t0,
                          t1, fscale, scores, r);
      if (splits == 1) store_pair<G>(&r, 1, op + (b * heads + h * G) * dim);
    }
  });
  if (splits == 1) return;
  for (int64_t pair = 0; pair < pairs; ++pair) {  // fewer pairs than twice the threads: a few dozen rows
    const int64_t b = pair / kv_heads, h = pair % kv_heads;
    store_pair<G>(parts.data() + pair * splits, splits, op + (b * heads + h * G) * dim);
  }
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
