// Every decoder layer of a decode-only step in one call: the same operators the eager runner calls from
// Python, called from C++ instead.
//
// At batch 1 a SmolLM2 step is ~4 ms of kernels and, from Python, ~2 ms more of interpreter and dispatch
// around them (some 15 calls a layer, each paying argument parsing, checks and a tensor's Python wrapper).
// This operator runs the same sequence of operators per layer through the dispatcher, so its output is bit
// for bit the eager runner's (engine.model_runner.ModelRunner.execute):
//
//   x = rms_norm(h)                                    (then, each later layer: h += residual; x = norm(h))
//   qkv = int4_linear(x); q = rope_write_kv(qkv, cos, sin, cache, slots)[:, :H]
//   o = int4_linear(paged_decode_attention(q, cache, block_tables, context_lens).view(n, H * D))
//   h += o; x = rms_norm(h)
//   residual = int4_linear(silu_mul(int4_linear(x)))             (silu(gate) * up)
//   ... and after the last layer h + residual is returned.
//
//   decode_layers(h [n, hidden], norms [2 L: input, post per layer], packed, scales [4 L: qkv, o, gate_up,
//                 down per layer, int4_linear's layout], n_out [4], cos [n, D], sin_signed [n, D],
//                 layer_kvs [L] (written in place), slots [n], block_tables [n, M], context_lens [n],
//                 block_size, scale, heads, kv_heads, eps) -> h after the last layer [n, hidden]
//
// Each operator checks its own arguments as it does when called from Python; this one checks the lists'
// lengths. Built with the other kernels into one library (engine/cpu_kernels.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>

namespace {

using c10::TypedOperatorHandle;

struct Operators {
  TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)> int4_linear;
  TypedOperatorHandle<at::Tensor(at::Tensor, at::Tensor, double)> rms_norm;
  TypedOperatorHandle<at::Tensor(const at::Tensor&)> silu_mul;
  TypedOperatorHandle<at::Tensor(at::Tensor, at::Tensor, at::Tensor, double)> add_rms_norm;
  TypedOperatorHandle<at::Tensor(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t)>
      rope_write_kv;
  TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                 double)>
      paged_decode_attention;
};

// Looked up once: the handles stay valid for the process (the library is never unloaded).
const Operators& operators() {
  static const Operators ops = [] {
    auto& d = c10::Dispatcher::singleton();
    auto find = [&d](const char* name) { return d.findSchemaOrThrow(name, ""); };
    return Operators{
        find("splitserve_cpu::int4_linear")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(),
        find("splitserve_cpu::rms_norm").typed<at::Tensor(at::Tensor, at::Tensor, double)>(),
        find("splitserve_cpu::silu_mul").typed<at::Tensor(const at::Tensor&)>(),
        find("splitserve_cpu::add_rms_norm").typed<at::Tensor(at::Tensor, at::Tensor, at::Tensor, double)>(),
        find("splitserve_cpu::rope_write_kv")
            .typed<at::Tensor(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t)>(),
        find("splitserve_cpu::paged_decode_attention")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              double)>(),
    };
  }();
  return ops;
}

enum Projection : int64_t { kQKV = 0, kO = 1, kGateUp = 2, kDown = 3, kProjections = 4 };

at::Tensor decode_layers(const at::Tensor& h_in, at::TensorList norms, at::TensorList packed, at::TensorList scales,
                         at::IntArrayRef n_out, const at::Tensor& cos, const at::Tensor& sin_signed,
                         at::TensorList layer_kvs, const at::Tensor& slots, const at::Tensor& block_tables,
                         const at::Tensor& context_lens, int64_t block_size, double scale, int64_t heads,
                         int64_t kv_heads, double eps) {
  const int64_t layers = static_cast<int64_t>(layer_kvs.size());
  TORCH_CHECK(layers > 0, "decode_layers: no layers");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * layers,
              "decode_layers: norms must hold 2 per layer (input, post), got ", norms.size(), " for ", layers);
  TORCH_CHECK(static_cast<int64_t>(packed.size()) == kProjections * layers &&
                  static_cast<int64_t>(scales.size()) == kProjections * layers,
              "decode_layers: packed and scales must hold 4 per layer (qkv, o, gate_up, down)");
  TORCH_CHECK(static_cast<int64_t>(n_out.size()) == kProjections, "decode_layers: n_out must hold 4 widths");
  TORCH_CHECK(h_in.dim() == 2 && n_out[kGateUp] % 2 == 0, "decode_layers: h must be [n, hidden]");
  const Operators& op = operators();
  const int64_t n = h_in.size(0);
  auto linear = [&](const at::Tensor& x, int64_t layer, Projection p) {
    const int64_t i = kProjections * layer + p;
    return op.int4_linear.call(x, packed[i], scales[i], n_out[p]);
  };
  at::Tensor h = h_in.clone();  // updated in place below; the caller's tensor is left as it was
  at::Tensor residual;
  at::Tensor x;
  for (int64_t l = 0; l < layers; ++l) {
    x = l == 0 ? op.rms_norm.call(h, norms[0], eps) : op.add_rms_norm.call(h, residual, norms[2 * l], eps);
    at::Tensor qk = op.rope_write_kv.call(linear(x, l, kQKV), cos, sin_signed, layer_kvs[l], slots, heads, kv_heads);
    at::Tensor attn = op.paged_decode_attention.call(qk.narrow(1, 0, heads), layer_kvs[l], block_tables,
                                                     context_lens, block_size, scale);
    x = op.add_rms_norm.call(h, linear(attn.view({n, -1}), l, kO), norms[2 * l + 1], eps);
    residual = linear(op.silu_mul.call(linear(x, l, kGateUp)), l, kDown);
  }
  return at::add(h, residual);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  // layer_kvs are written in place (each layer's new keys and values at `slots`).
  m.def("decode_layers(Tensor h, Tensor[] norms, Tensor[] packed, Tensor[] scales, int[] n_out, Tensor cos, "
        "Tensor sin_signed, Tensor(a!)[] layer_kvs, Tensor slots, Tensor block_tables, Tensor context_lens, "
        "int block_size, float scale, int heads, int kv_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) { m.impl("decode_layers", &decode_layers); }
