// RMSNorm of 16-bit rows in one call, optionally after adding the residual branch in place.
//
// torch's own CPU rms_norm for bfloat16 is a composite of about ten operators (upcast, square, mean,
// rsqrt, multiplies, downcasts): ~22 us per call at batch 1, and a decode step makes 61 of them. Here one
// pass sums the squares in float32 and a second writes the output, rounded exactly where transformers'
// LlamaRMSNorm rounds: the normalized row to the input dtype first, then the product with the weight.
//
//   rms_norm(x, w, eps)          -> w * round(x * rsqrt(mean(x^2) + eps))
//   add_rms_norm(h, d, w, eps)   -> h += d (rounded to h's dtype, as `h + d` is), then rms_norm(h, w, eps)
//
// Built with engine/csrc/paged_attention.cpp into one library (engine/cpu_kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace {

template <typename T>
inline float wide(T x) { return static_cast<float>(x); }

template <typename T>
void norm_rows(T* h, const T* delta, const T* weight, T* out, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = h + r * dim;
      if (delta != nullptr) {
        const T* d = delta + r * dim;
        for (int64_t i = 0; i < dim; ++i) row[i] = static_cast<T>(wide(row[i]) + wide(d[i]));
      }
      float sum = 0.f;
      for (int64_t i = 0; i < dim; ++i) {
        const float v = wide(row[i]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
      T* o = out + r * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const T normed = static_cast<T>(wide(row[i]) * inv);  // rounded to the input dtype first
        o[i] = static_cast<T>(wide(weight[i]) * wide(normed));
      }
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), op, ": contiguous tensors only");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x and weight differ in dtype");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), op,
              ": weight must be [hidden] with hidden = x's last dimension");
}

at::Tensor run(at::Tensor h, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps,
               const char* op) {
  check(h, weight, op);
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == h.sizes() && delta->scalar_type() == h.scalar_type() && delta->is_contiguous(),
                op, ": the residual branch must match h in shape and dtype, contiguous");
  }
  at::Tensor out = at::empty_like(h);
  const int64_t dim = h.size(-1);
  const int64_t rows = dim == 0 ? 0 : h.numel() / dim;
  const float e = static_cast<float>(eps);
  switch (h.scalar_type()) {
    case at::kBFloat16:
      norm_rows(h.data_ptr<c10::BFloat16>(), delta ? delta->data_ptr<c10::BFloat16>() : nullptr,
                weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, dim, e);
      break;
    case at::kHalf:
      norm_rows(h.data_ptr<c10::Half>(), delta ? delta->data_ptr<c10::Half>() : nullptr,
                weight.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, dim, e);
      break;
    default: TORCH_CHECK(false, op, ": bfloat16 or float16 only (float32 keeps the reference formula)");
  }
  return out;
}

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  return run(x, c10::nullopt, weight, eps, "rms_norm");
}

at::Tensor add_rms_norm(at::Tensor h, at::Tensor delta, at::Tensor weight, double eps) {
  return run(h, delta, weight, eps, "add_rms_norm");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // h is updated in place (h += delta) and the norm of the sum returned.
  m.def("add_rms_norm(Tensor(a!) h, Tensor delta, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
}
