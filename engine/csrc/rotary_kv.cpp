// Rotary embedding of a decode step's queries and keys, and the write of its keys and values into the paged
// cache, in one call (the eager forward made six per layer: two multiplies, a roll and an add for the
// rotary, a stack and an index_copy_ for the cache).
//
//   rope_write_kv(qkv [n, (H + 2 KV) * D], cos [n, D], sin_signed [n, D], layer_kv [2, KV, slots, D],
//                 slots [n] int64, H, KV) -> qk [n, H + KV, D]
//
// qk is rotated q and k, rounded exactly as `x * cos + roll(x, D/2) * sin_signed` is in the tensor's dtype
// (each product rounded, then their sum: engine.llama_ops.rotate); the rotated k and the untouched v are
// written at `slots` of the cache (engine.kv_cache.write_layer_kv's layout). 16-bit tensors only; float32
// keeps the reference operators. Built with the other kernels into one library (engine/cpu_kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace {

template <typename T>
inline float wide(T x) { return static_cast<float>(x); }

template <typename T>
void rope_rows(const T* qkv, int64_t row_stride, const T* cos, const T* sin, T* kv, int64_t kv_head_stride,
               int64_t slot_count, const int64_t* slots, T* qk, int64_t n, int64_t heads, int64_t kv_heads,
               int64_t dim) {
  const int64_t half = dim / 2;
  const int64_t rotated = heads + kv_heads;
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = qkv + r * row_stride;
      const T* c = cos + r * dim;
      const T* s = sin + r * dim;
      const int64_t slot = slots[r];
      for (int64_t h = 0; h < rotated; ++h) {
        const T* x = src + h * dim;
        T* out = qk + (r * rotated + h) * dim;
        for (int64_t i = 0; i < dim; ++i) {
          const T a = static_cast<T>(wide(x[i]) * wide(c[i]));
          const T b = static_cast<T>(wide(x[i < half ? i + half : i - half]) * wide(s[i]));
          out[i] = static_cast<T>(wide(a) + wide(b));
        }
        if (h >= heads) {  // a key head: into the cache's K half
          T* dst = kv + (h - heads) * kv_head_stride + slot * dim;
          for (int64_t i = 0; i < dim; ++i) dst[i] = out[i];
        }
      }
      for (int64_t h = 0; h < kv_heads; ++h) {  // the values, as they are, into the V half
        const T* x = src + (rotated + h) * dim;
        T* dst = kv + (kv_heads + h) * kv_head_stride + slot * dim;
        for (int64_t i = 0; i < dim; ++i) dst[i] = x[i];
      }
    }
  });
}

at::Tensor rope_write_kv(at::Tensor qkv, at::Tensor cos, at::Tensor sin_signed, at::Tensor layer_kv,
                         at::Tensor slots, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && layer_kv.device().is_cpu() && slots.device().is_cpu(),
              "rope_write_kv: CPU tensors only");
  TORCH_CHECK(layer_kv.dim() == 4 && layer_kv.size(0) == 2 && layer_kv.size(1) == kv_heads && layer_kv.is_contiguous(),
              "rope_write_kv: layer_kv must be a contiguous [2, kv_heads, slots, head_dim] cache");
  const int64_t dim = layer_kv.size(3);
  const int64_t n = qkv.size(0);
  TORCH_CHECK(dim % 2 == 0, "rope_write_kv: head_dim must be even");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (heads + 2 * kv_heads) * dim,
              "rope_write_kv: qkv must be [n, (heads + 2 kv_heads) * head_dim] with unit column stride");
  TORCH_CHECK(cos.is_contiguous() && sin_signed.is_contiguous() && cos.numel() == n * dim &&
                  sin_signed.numel() == n * dim,
              "rope_write_kv: cos and sin_signed must be contiguous [n, head_dim]");
  TORCH_CHECK(qkv.scalar_type() == layer_kv.scalar_type() && cos.scalar_type() == qkv.scalar_type() &&
                  sin_signed.scalar_type() == qkv.scalar_type(),
              "rope_write_kv: qkv, cos, sin_signed and the cache must share one dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.numel() == n && slots.is_contiguous(),
              "rope_write_kv: slots must be [n] int64");
  const int64_t slot_count = layer_kv.size(2);
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(slot_ptr[r] >= 0 && slot_ptr[r] < slot_count, "rope_write_kv: slot ", slot_ptr[r],
                " outside the cache's ", slot_count);
  }
  at::Tensor qk = at::empty({n, heads + kv_heads, dim}, qkv.options());
  const int64_t head_stride = slot_count * dim;
  switch (qkv.scalar_type()) {
    case at::kBFloat16:
      rope_rows(qkv.data_ptr<c10::BFloat16>(), qkv.stride(0), cos.data_ptr<c10::BFloat16>(),
                sin_signed.data_ptr<c10::BFloat16>(), layer_kv.data_ptr<c10::BFloat16>(), head_stride, slot_count,
                slot_ptr, qk.data_ptr<c10::BFloat16>(), n, heads, kv_heads, dim);
      break;
    case at::kHalf:
      rope_rows(qkv.data_ptr<c10::Half>(), qkv.stride(0), cos.data_ptr<c10::Half>(), sin_signed.data_ptr<c10::Half>(),
                layer_kv.data_ptr<c10::Half>(), head_stride, slot_count, slot_ptr, qk.data_ptr<c10::Half>(), n,
                heads, kv_heads, dim);
      break;
    default: TORCH_CHECK(false, "rope_write_kv: bfloat16 or float16 only (float32 keeps the reference operators)");
  }
  return qk;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  // layer_kv is written in place (the rotated keys and the values at `slots`).
  m.def("rope_write_kv(Tensor qkv, Tensor cos, Tensor sin_signed, Tensor(a!) layer_kv, Tensor slots, int heads, "
        "int kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) { m.impl("rope_write_kv", &rope_write_kv); }
