// Torch binding of the CUDA kernels (video_attention_cuda_kernels.cuh): same signature and
// contract as the CPU op in video_attention_cpu.cpp; built by setup.py where a CUDA toolkit
// and a CUDA build of torch are present.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "video_attention_cuda_kernels.cuh"

namespace hippo {

void video_key_colsum_cuda(const torch::Tensor& query, const torch::Tensor& key_cache, int64_t layout,
                           int64_t fp8_format, const torch::Tensor& block_table, int64_t key_start,
                           int64_t num_keys, double scale, double k_scale, torch::Tensor& out) {
  TORCH_CHECK(query.is_cuda() && key_cache.is_cuda() && out.is_cuda(), "video_key_colsum (CUDA): tensors must be on a GPU");
  TORCH_CHECK(query.dim() == 3, "query must be [L, H_q, d], got ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [blocks, H_kv, block_size, d], got ", key_cache.sizes());
  TORCH_CHECK(layout == ROWS || layout == TRANSPOSED || layout == VNNI16, "layout must be 0, 1 or 2, got ", layout);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == num_keys,
              "out must be a contiguous float32 [", num_keys, "]");
  const int64_t num_kv_heads = key_cache.size(1), block_size = key_cache.size(2), d = key_cache.size(3);
  TORCH_CHECK(query.size(2) == d && query.size(1) % num_kv_heads == 0, "query ", query.sizes(),
              " does not match the key cache ", key_cache.sizes());
  TORCH_CHECK(num_keys > 0 && key_start >= 0, "need num_keys > 0 and key_start >= 0");
  TORCH_CHECK(block_table.dim() == 1 && block_table.numel() > (key_start + num_keys - 1) / block_size,
              "block_table too short for positions up to ", key_start + num_keys - 1);
  if (query.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const torch::Tensor q = (query.to(at::kFloat) * scale).contiguous();
  const torch::Tensor table = block_table.to(query.device(), at::kLong).contiguous();
  const int64_t tiles = (num_keys + cuda::kKeyTile - 1) / cuda::kKeyTile, pairs = query.size(0) * query.size(1);
  torch::Tensor scratch = torch::empty({2 * tiles * pairs + 2 * pairs}, q.options());
  cuda::Problem p{};
  p.q = q.data_ptr<float>();
  p.block_table = table.data_ptr<int64_t>();
  p.g = KeyCacheGeometry{key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3),
                         block_size, d, layout};
  p.num_rows = query.size(0);
  p.num_q_heads = query.size(1);
  p.num_kv_heads = num_kv_heads;
  p.key_start = key_start;
  p.num_keys = num_keys;
  p.k_scale = static_cast<float>(k_scale);
  p.out = out.data_ptr<float>();
  const auto st = key_cache.scalar_type();
  if (fp8_format != NOT_FP8 || st == at::kFloat8_e4m3fn || st == at::kFloat8_e5m2) {
    p.fp8_format = st == at::kFloat8_e4m3fn ? E4M3 : st == at::kFloat8_e5m2 ? E5M2 : fp8_format;
    TORCH_CHECK(p.fp8_format == E4M3 || p.fp8_format == E5M2, "fp8_format must be 1 or 2, got ", fp8_format);
    cuda::launch(static_cast<const uint8_t*>(key_cache.data_ptr()), p, scratch.data_ptr<float>(), stream);
  } else if (st == at::kFloat) {
    cuda::launch(key_cache.data_ptr<float>(), p, scratch.data_ptr<float>(), stream);
  } else if (st == at::kHalf) {
    cuda::launch(reinterpret_cast<const __half*>(key_cache.data_ptr()), p, scratch.data_ptr<float>(), stream);
  } else if (st == at::kBFloat16) {
    cuda::launch(reinterpret_cast<const __nv_bfloat16*>(key_cache.data_ptr()), p, scratch.data_ptr<float>(), stream);
  } else {
    TORCH_CHECK(false, "key cache dtype ", st, " is not float32, float16, bfloat16 or fp8");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hippo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hippo_vllm CUDA kernels: s_attn from vLLM's paged KV cache";
  m.def("video_key_colsum", &hippo::video_key_colsum_cuda,
        "Add the text->video softmax probabilities, summed over (query row, head), into out",
        py::arg("query"), py::arg("key_cache"), py::arg("layout"), py::arg("fp8_format"), py::arg("block_table"),
        py::arg("key_start"), py::arg("num_keys"), py::arg("scale"), py::arg("k_scale"), py::arg("out"));
}
