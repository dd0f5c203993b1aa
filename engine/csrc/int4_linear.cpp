// 4-bit weight GEMM/GEMV on AVX512-VNNI or AVX2: y = x @ W.T with W in 4 bits per weight (one scale and one
// minimum per 32 input channels), x quantized to int8 per 32 channels on entry.
//
// Why not torch's _weight_int4pack_mm_for_cpu: it de-quantizes every weight to float and multiplies in
// float, which costs several vector instructions per 16 weights. At batch 1 that kept SmolLM2-135M's
// decode step at ~10 GB/s of weights on one thread; from batch 8 on it is compute-bound (a batch-8 step
// 3.5x a batch-1 step). Here the multiply is an integer dot product (vpdpbusd: 64 multiply-adds of a u8
// weight nibble by an s8 activation per instruction), the way llama.cpp's Q4 x Q8 dots work, and the
// float work is once per group of 32 weights, not per weight.
//
// Weight layout (packed by engine/quant.py, `Int4Linear`): output rows in blocks of 16; a block's weights
// are K/8 chunks of 64 bytes, chunk c holding input channels 8c..8c+7 of the 16 rows: byte 4r+i has
// q[r][8c+i] in its low nibble and q[r][8c+4+i] in its high nibble. So one 64-byte load, masked and
// shifted, gives two vectors whose 32-bit lane r holds four consecutive weights of row r, and a dot with
// four activation bytes broadcast to every lane advances 16 rows at once with no horizontal sums.
// Scales: per block and group, 16 scales then 16 minimums (bfloat16), so W[r][k] = q * scale + minimum.
//
//   y[m][r] = sum_g scale[g][r] * sx[m][g] * dot(q[r][g], xq[m][g]) + minimum[g][r] * sum(x[m][g])
//
// with xq = round(x / sx), sx = max|x| / 127 per group of 32 (the activation error is ~0.4 % of a
// group's largest value; benchmarks.quality measures what it does to perplexity).
//
// Built with the other kernels into one library (engine/cpu_kernels.py, -march=native): with AVX512-VNNI
// each dot is one vpdpbusd over 16 rows; with AVX2 only, two instructions over 8 rows (same layout, same
// results). On a CPU with neither the operator refuses and `int4_vnni_available()` (named for the first
// kind) says false; engine/quant.py then keeps torch's int4 kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define SPLITSERVE_INT4_VNNI 1  // 512-bit vpdpbusd
#define SPLITSERVE_INT_DOT 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPLITSERVE_INT4_AVX2 1  // 256-bit vpmaddubsw + vpmaddwd in place of vpdpbusd (Zen 2/3, Intel before Ice Lake)
#define SPLITSERVE_INT_DOT 1
#endif
// Decode reads every weight once a step from DRAM, and one thread's hardware prefetcher alone leaves bandwidth
// unused (Zen 3, one thread: ~11 GB/s of weights in a decode step against 14 GB/s of plain reads); the AVX2 kernels also ask for
// the cache line this many bytes ahead.
#ifndef SPLITSERVE_PF
#define SPLITSERVE_PF 1024
#endif

namespace {

constexpr int64_t kGroup = 32;      // input channels per scale (and per activation scale)
constexpr int64_t kRows = 16;       // output rows per block (one 512-bit vector of int32 / float lanes)
constexpr int64_t kChunkBytes = 64; // one block's 8 input channels
constexpr int kMaxTile = 4;         // activation rows sharing one pass over a weight block

bool available() {
#ifdef SPLITSERVE_INT_DOT
  return true;
#else
  return false;
#endif
}

// x rows quantized per group: xq (int8), the group's scale and its exact float sum.
template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, int8_t* xq, float* sx, float* xsum) {
  const int64_t groups = k / kGroup;
  at::parallel_for(0, m * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / groups, g = i % groups;
      const T* src = x + row * k + g * kGroup;
      float v[kGroup];
      float amax = 0.f, sum = 0.f;
      for (int64_t j = 0; j < kGroup; ++j) {
        v[j] = static_cast<float>(src[j]);
        amax = std::max(amax, std::fabs(v[j]));
        sum += v[j];
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int8_t* dst = xq + row * k + g * kGroup;
      for (int64_t j = 0; j < kGroup; ++j) dst[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
      sx[i] = amax / 127.f;
      xsum[i] = sum;
    }
  });
}

// x [m, k] quantized per group, held for one call: xq int8 [m, k], the groups' scales and exact sums [m, k / 32].
struct QuantizedRows {
  std::vector<int8_t> xq;
  std::vector<float> sx, xsum;
};

template <typename T>
QuantizedRows quantize(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1);
  QuantizedRows rows{std::vector<int8_t>(m * k), std::vector<float>(m * (k / kGroup)),
                     std::vector<float>(m * (k / kGroup))};
  quantize_rows(x.data_ptr<T>(), m, k, rows.xq.data(), rows.sx.data(), rows.xsum.data());
  return rows;
}

#ifdef SPLITSERVE_INT_DOT
// Calls f(std::integral_constant<int, n>{}) for n = tile in 1..kMaxTile: the tile kernels are unrolled per size.
template <typename F>
inline void with_tile(int tile, F&& f) {
  switch (tile) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// Both kernels' outer loop: blocks of 16 output rows shared among the threads (a thread takes whole blocks),
// activation rows in tiles of up to kMaxTile; tile(b, row, size, out) fills out[0..size) with block b's 16
// sums for activation rows row..row+size-1, stored here in y's dtype.
template <typename T, typename Tile>
void blocks_by_tiles(int64_t m, int64_t n_blocks, int64_t n_out, T* y, const Tile& tile) {
  at::parallel_for(0, n_blocks, 4, [&](int64_t begin, int64_t end) {
    float out[kMaxTile][kRows];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t row = 0; row < m; row += kMaxTile) {
        const int size = static_cast<int>(std::min<int64_t>(kMaxTile, m - row));
        tile(b, row, size, out);
        const int64_t cols = std::min<int64_t>(kRows, n_out - b * kRows);
        for (int t = 0; t < size; ++t) {
          T* dst = y + (row + t) * n_out + b * kRows;
          for (int64_t j = 0; j < cols; ++j) dst[j] = static_cast<T>(out[t][j]);
        }
      }
    }
  });
}

#ifdef SPLITSERVE_INT4_VNNI
inline __m512 bf16_to_float(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// One block of 16 output rows for `Tile` activation rows: out[t][0..15] (float).
template <int Tile>
inline void block_tile(const uint8_t* w, const c10::BFloat16* scales, const int8_t* xq, const float* sx,
                       const float* xsum, int64_t k, float out[][kRows]) {
  const int64_t groups = k / kGroup;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[Tile];
  for (int t = 0; t < Tile; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i lo_acc[Tile], hi_acc[Tile];
    for (int t = 0; t < Tile; ++t) lo_acc[t] = hi_acc[t] = _mm512_setzero_si512();
    for (int64_t c = 0; c < kGroup / 8; ++c) {
      const __m512i packed = _mm512_loadu_si512(w + (g * (kGroup / 8) + c) * kChunkBytes);
      const __m512i lo = _mm512_and_si512(packed, nibble);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
      for (int t = 0; t < Tile; ++t) {
        const int8_t* xs = xq + t * k + g * kGroup + c * 8;
        int32_t first, second;
        std::memcpy(&first, xs, 4);
        std::memcpy(&second, xs + 4, 4);
        lo_acc[t] = _mm512_dpbusd_epi32(lo_acc[t], lo, _mm512_set1_epi32(first));
        hi_acc[t] = _mm512_dpbusd_epi32(hi_acc[t], hi, _mm512_set1_epi32(second));
      }
    }
    const __m512 scale = bf16_to_float(scales + g * 2 * kRows);
    const __m512 minimum = bf16_to_float(scales + g * 2 * kRows + kRows);
    for (int t = 0; t < Tile; ++t) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[t], hi_acc[t]));
      acc[t] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(sx[t * groups + g])), acc[t]);
      acc[t] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(xsum[t * groups + g]), acc[t]);
    }
  }
  for (int t = 0; t < Tile; ++t) _mm512_storeu_ps(out[t], acc[t]);
}

// int8 weights, one scale per 32 input channels (GGUF's Q8_0 grid: the tied embedding / LM head of a Q4
// GGUF is stored so, and 4 bits lose it). vpdpbusd multiplies u8 by s8, so the activations enter as
// u8 (xq + 128) against the s8 weights, and 128 * (the group's weight sum, precomputed) comes off the
// integer sum. Layout: blocks of 16 rows, chunks of 4 input channels: byte 4r + i of chunk c is w[r][4c + i].
template <int Tile>
inline void block_tile_int8(const int8_t* w, const float* scales, const int32_t* offsets, const int8_t* xq,
                            const float* sx, int64_t k, float out[][kRows]) {
  const int64_t groups = k / kGroup;
  const __m512i to_unsigned = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  __m512 acc[Tile];
  for (int t = 0; t < Tile; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // Two integer sums per row (even and odd chunks): two independent vpdpbusd chains hide its latency.
    __m512i even[Tile], odd[Tile];
    const __m512i offset = _mm512_loadu_si512(offsets + g * kRows);
    for (int t = 0; t < Tile; ++t) {
      even[t] = _mm512_sub_epi32(_mm512_setzero_si512(), offset);
      odd[t] = _mm512_setzero_si512();
    }
    for (int64_t c = 0; c < kGroup / 4; c += 2) {
      const __m512i w0 = _mm512_loadu_si512(w + (g * (kGroup / 4) + c) * kChunkBytes);
      const __m512i w1 = _mm512_loadu_si512(w + (g * (kGroup / 4) + c + 1) * kChunkBytes);
      for (int t = 0; t < Tile; ++t) {
        int32_t four[2];
        std::memcpy(four, xq + t * k + g * kGroup + c * 4, 8);
        // s8 -> u8 + 128 (the offset takes the 128s off)
        even[t] = _mm512_dpbusd_epi32(even[t], _mm512_xor_si512(_mm512_set1_epi32(four[0]), to_unsigned), w0);
        odd[t] = _mm512_dpbusd_epi32(odd[t], _mm512_xor_si512(_mm512_set1_epi32(four[1]), to_unsigned), w1);
      }
    }
    const __m512 scale = _mm512_loadu_ps(scales + g * kRows);
    for (int t = 0; t < Tile; ++t) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even[t], odd[t]));
      acc[t] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(sx[t * groups + g])), acc[t]);
    }
  }
  for (int t = 0; t < Tile; ++t) _mm512_storeu_ps(out[t], acc[t]);
}

#endif  // SPLITSERVE_INT4_VNNI

#ifdef SPLITSERVE_INT4_AVX2
// AVX2 has no vpdpbusd: vpmaddubsw multiplies u8 by s8 and adds neighbours into s16, vpmaddwd by ones adds
// those into the 32-bit lane, the same four-byte dot per lane. Exact while a pair fits s16: int4 weights
// (<= 15 * 127 * 2) and the int8 head's |w| * x (<= 128 * 127 * 2) do, so the integer sums, and the float
// work after them done in the same order, are the VNNI kernel's: both give the same outputs.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

// The int4 kernel widens once per group instead of once per product: a group's 8 vpmaddubsw results (two per
// 8-channel chunk) are summed in s16 first, each lane's pair at most 15 * 127 * 2 = 3810, so the 8 sum to at
// most 30480 < 32767, exact; one vpmaddwd by ones then makes the 32-bit lane sums. Same integers as above.
inline __m256i widen_s16_pairs(__m256i sums) { return _mm256_madd_epi16(sums, _mm256_set1_epi16(1)); }

inline __m256 bf16_to_float8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// block_tile on 256-bit vectors: a 64-byte chunk is rows 0-7 in its first 32 bytes and rows 8-15 in the
// rest. A tile of up to 2 activation rows takes both halves in one pass (each activation broadcast serves 16
// rows); a larger tile one half a pass, which keeps its accumulators within AVX2's 16 registers.
template <int Tile, int Halves>
inline void block_tile_pass(const uint8_t* w, const c10::BFloat16* scales, const int8_t* xq, const float* sx,
                            const float* xsum, int64_t k, int first_half, float out[][kRows]) {
  const int64_t groups = k / kGroup;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256 acc[Halves][Tile];
  for (int h = 0; h < Halves; ++h)
    for (int t = 0; t < Tile; ++t) acc[h][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sums[Halves][Tile];  // s16 pair sums over the group (widen_s16_pairs)
    for (int h = 0; h < Halves; ++h)
      for (int t = 0; t < Tile; ++t) sums[h][t] = _mm256_setzero_si256();
    for (int64_t c = 0; c < kGroup / 8; ++c) {
      const uint8_t* chunk = w + (g * (kGroup / 8) + c) * kChunkBytes;
      if (first_half == 0) _mm_prefetch(reinterpret_cast<const char*>(chunk + SPLITSERVE_PF), _MM_HINT_T0);
      __m256i lo[Halves], hi[Halves];
      for (int h = 0; h < Halves; ++h) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 * (first_half + h)));
        lo[h] = _mm256_and_si256(packed, nibble);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
      }
      for (int t = 0; t < Tile; ++t) {
        const int8_t* xs = xq + t * k + g * kGroup + c * 8;
        int32_t first, second;
        std::memcpy(&first, xs, 4);
        std::memcpy(&second, xs + 4, 4);
        const __m256i x_lo = _mm256_set1_epi32(first), x_hi = _mm256_set1_epi32(second);
        for (int h = 0; h < Halves; ++h)
          sums[h][t] = _mm256_add_epi16(sums[h][t], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], x_lo),
                                                                     _mm256_maddubs_epi16(hi[h], x_hi)));
      }
    }
    for (int h = 0; h < Halves; ++h) {
      const __m256 scale = bf16_to_float8(scales + g * 2 * kRows + 8 * (first_half + h));
      const __m256 minimum = bf16_to_float8(scales + g * 2 * kRows + kRows + 8 * (first_half + h));
      for (int t = 0; t < Tile; ++t) {
        const __m256 dot = _mm256_cvtepi32_ps(widen_s16_pairs(sums[h][t]));
        acc[h][t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(sx[t * groups + g])), acc[h][t]);
        acc[h][t] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(xsum[t * groups + g]), acc[h][t]);
      }
    }
  }
  for (int h = 0; h < Halves; ++h)
    for (int t = 0; t < Tile; ++t) _mm256_storeu_ps(out[t] + 8 * (first_half + h), acc[h][t]);
}

template <int Tile>
inline void block_tile(const uint8_t* w, const c10::BFloat16* scales, const int8_t* xq, const float* sx,
                       const float* xsum, int64_t k, float out[][kRows]) {
  if constexpr (Tile <= 2) {
    block_tile_pass<Tile, 2>(w, scales, xq, sx, xsum, k, 0, out);
  } else {
    block_tile_pass<Tile, 1>(w, scales, xq, sx, xsum, k, 0, out);
    block_tile_pass<Tile, 1>(w, scales, xq, sx, xsum, k, 1, out);
  }
}

// block_tile_int8 on AVX2: s8 x s8 as |w| (u8) x (x with w's sign), so no +128 offset (`offsets` unused).
template <int Tile>
inline void block_tile_int8(const int8_t* w, const float* scales, const int32_t* /*offsets*/, const int8_t* xq,
                            const float* sx, int64_t k, float out[][kRows]) {
  const int64_t groups = k / kGroup;
  for (int half = 0; half < 2; ++half) {
    __m256 acc[Tile];
    for (int t = 0; t < Tile; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256i dots[Tile];
      for (int t = 0; t < Tile; ++t) dots[t] = _mm256_setzero_si256();
      for (int64_t c = 0; c < kGroup / 4; ++c) {
        const int8_t* line = w + (g * (kGroup / 4) + c) * kChunkBytes;
        if (half == 0) _mm_prefetch(reinterpret_cast<const char*>(line + SPLITSERVE_PF), _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 32 * half));
        const __m256i magnitude = _mm256_abs_epi8(wv);  // |-128| reads as 128 unsigned
        for (int t = 0; t < Tile; ++t) {
          int32_t four;
          std::memcpy(&four, xq + t * k + g * kGroup + c * 4, 4);
          dots[t] = dot_u8s8(dots[t], magnitude, _mm256_sign_epi8(_mm256_set1_epi32(four), wv));
        }
      }
      const __m256 scale = _mm256_loadu_ps(scales + g * kRows + 8 * half);
      for (int t = 0; t < Tile; ++t) {
        const __m256 dot = _mm256_cvtepi32_ps(dots[t]);
        acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(sx[t * groups + g])), acc[t]);
      }
    }
    for (int t = 0; t < Tile; ++t) _mm256_storeu_ps(out[t] + 8 * half, acc[t]);
  }
}
#endif  // SPLITSERVE_INT4_AVX2

template <typename T>
void gemm(const int8_t* xq, const float* sx, const float* xsum, const uint8_t* w, const c10::BFloat16* scales,
          int64_t m, int64_t k, int64_t n_blocks, int64_t n_out, T* y) {
  const int64_t groups = k / kGroup;
  const int64_t block_bytes = k / 8 * kChunkBytes;  // 16 rows x k weights (4.5 KB for k = 576)
  const int64_t block_scales = groups * 2 * kRows;
  blocks_by_tiles(m, n_blocks, n_out, y, [&](int64_t b, int64_t row, int size, float out[][kRows]) {
    with_tile(size, [&](auto n) {
      block_tile<decltype(n)::value>(w + b * block_bytes, scales + b * block_scales, xq + row * k, sx + row * groups,
                                     xsum + row * groups, k, out);
    });
  });
}

template <typename T>
void gemm_int8(const int8_t* xq, const float* sx, const int8_t* w, const float* scales, const int32_t* offsets,
               int64_t m, int64_t k, int64_t n_blocks, int64_t n_out, T* y) {
  const int64_t groups = k / kGroup;
  blocks_by_tiles(m, n_blocks, n_out, y, [&](int64_t b, int64_t row, int size, float out[][kRows]) {
    with_tile(size, [&](auto n) {
      block_tile_int8<decltype(n)::value>(w + b * (k / 4) * kChunkBytes, scales + b * groups * kRows,
                                          offsets + b * groups * kRows, xq + row * k, sx + row * groups, k, out);
    });
  });
}
#endif

template <typename T>
at::Tensor run_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                    const at::Tensor& offsets, int64_t n_out) {
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, n_out}, x.options());
  if (m == 0) return y;
  const QuantizedRows rows = quantize<T>(x);
#ifdef SPLITSERVE_INT_DOT
  gemm_int8(rows.xq.data(), rows.sx.data(), packed.data_ptr<int8_t>(), scales.data_ptr<float>(),
            offsets.data_ptr<int32_t>(), m, k, packed.size(0), n_out, y.data_ptr<T>());
#endif
  return y;
}

template <typename T>
at::Tensor run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t n_out) {
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, n_out}, x.options());
  if (m == 0) return y;
  const QuantizedRows rows = quantize<T>(x);
#ifdef SPLITSERVE_INT_DOT
  gemm(rows.xq.data(), rows.sx.data(), rows.xsum.data(), packed.data_ptr<uint8_t>(), scales.data_ptr<c10::BFloat16>(),
       m, k, packed.size(0), n_out, y.data_ptr<T>());
#endif
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t n_out) {
  TORCH_CHECK(available(), "int4_linear: this library was built for a CPU without AVX512-VNNI or AVX2");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu(),
              "int4_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int4_linear: x must be a contiguous [rows, in_features] matrix");
  const int64_t k = x.size(1);
  TORCH_CHECK(k % kGroup == 0, "int4_linear: in_features must be a multiple of ", kGroup, ", got ", k);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(1) == k / 8 && packed.size(2) == kChunkBytes,
              "int4_linear: packed must be uint8 [blocks, in_features / 8, 64], contiguous");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.dim() == 4 &&
                  scales.size(0) == packed.size(0) && scales.size(1) == k / kGroup && scales.size(2) == 2 &&
                  scales.size(3) == kRows,
              "int4_linear: scales must be bfloat16 [blocks, in_features / 32, 2, 16], contiguous");
  TORCH_CHECK(n_out > (packed.size(0) - 1) * kRows && n_out <= packed.size(0) * kRows,
              "int4_linear: n_out ", n_out, " does not fit ", packed.size(0), " blocks of 16 rows");
  switch (x.scalar_type()) {
    case at::kBFloat16: return run<c10::BFloat16>(x, packed, scales, n_out);
    case at::kHalf: return run<c10::Half>(x, packed, scales, n_out);
    case at::kFloat: return run<float>(x, packed, scales, n_out);
    default: TORCH_CHECK(false, "int4_linear: x must be bfloat16, float16 or float32");
  }
}

at::Tensor int8_group_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& offsets, int64_t n_out) {
  TORCH_CHECK(available(), "int8_group_linear: this library was built for a CPU without AVX512-VNNI or AVX2");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu() && offsets.device().is_cpu(),
              "int8_group_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int8_group_linear: x must be a contiguous [rows, in_features] matrix");
  const int64_t k = x.size(1);
  TORCH_CHECK(k % kGroup == 0, "int8_group_linear: in_features must be a multiple of ", kGroup, ", got ", k);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(1) == k / 4 && packed.size(2) == kChunkBytes,
              "int8_group_linear: packed must be int8 [blocks, in_features / 4, 64], contiguous");
  const std::vector<int64_t> per_group{packed.size(0), k / kGroup, kRows};
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.sizes() == per_group,
              "int8_group_linear: scales must be float32 [blocks, in_features / 32, 16], contiguous");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.sizes() == per_group,
              "int8_group_linear: offsets must be int32 [blocks, in_features / 32, 16], contiguous");
  TORCH_CHECK(n_out > (packed.size(0) - 1) * kRows && n_out <= packed.size(0) * kRows,
              "int8_group_linear: n_out ", n_out, " does not fit ", packed.size(0), " blocks of 16 rows");
  switch (x.scalar_type()) {
    case at::kBFloat16: return run_int8<c10::BFloat16>(x, packed, scales, offsets, n_out);
    case at::kHalf: return run_int8<c10::Half>(x, packed, scales, offsets, n_out);
    case at::kFloat: return run_int8<float>(x, packed, scales, offsets, n_out);
    default: TORCH_CHECK(false, "int8_group_linear: x must be bfloat16, float16 or float32");
  }
}

bool int4_vnni_available() { return available(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, int n_out) -> Tensor");
  // offsets: 128 x each group's weight sum (the u8 activations' +128 taken off the integer sums)
  m.def("int8_group_linear(Tensor x, Tensor packed, Tensor scales, Tensor offsets, int n_out) -> Tensor");
  m.def("int4_vnni_available() -> bool", &int4_vnni_available);
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_group_linear", &int8_group_linear);
}
