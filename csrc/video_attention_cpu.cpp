// s_attn straight from vLLM's paged KV cache, on the CPU.
//
// For one request, one layer and one video: the text query rows [L, H_q, d] against the
// video's keys, read from the paged cache through the request's block table, softmax over
// the video keys (GQA: query head h reads kv head h / (H_q / H_kv)), and the probabilities
// summed over (query row, head) pairs are added into out[N_v] (float32). The per-layer mean
// and the mean over layers stay with the caller (hippo_vllm.core.AttentionScoreAccumulator),
// whose torch code is the oracle of this kernel.
//
// Per kv head the video keys are unpacked once (any layout, fp8 dequantised with the
// layer's key scale) into a float32 panel [d, N_v]; then blocks of query rows run in
// parallel, each computing its logits row by row against the panel, exponentials, row
// sums and the column sums into a per-thread buffer. Nothing of size rows x N_v is kept.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "key_layouts.h"

// Hot loops are compiled for AVX-512, AVX2+FMA and plain x86-64, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HIPPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HIPPO_CLONES
#endif

namespace hippo {
namespace {

constexpr int kRowBlock = 4;    // query rows per micro-kernel pass
constexpr int kTaskRows = 16;   // query rows per parallel task
constexpr int kKeyTile = 64;    // keys per micro-kernel pass

// exp(x) for x <= 0 (logits minus their row maximum), vectorisable: 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2/2; relative error ~1e-7. Below -87 it returns 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// logits[r][j] = sum_c q[r][c] * key j channel c, for kRowBlock rows and every key. The panel
// is tile-major, [tiles][d][kKeyTile], so each tile is one contiguous run (a [d][N] panel
// would read d rows a power of two apart: cache-set and TLB conflicts at long videos).
HIPPO_CLONES void row_block_logits(const float* q, int64_t d, const float* panel, int64_t num_keys,
                                   float* const* logits) {
  for (int64_t j0 = 0; j0 < num_keys; j0 += kKeyTile) {
    const int64_t n = std::min<int64_t>(kKeyTile, num_keys - j0);
    const float* tile = panel + (j0 / kKeyTile) * d * kKeyTile;
    float acc[kRowBlock][kKeyTile];
    for (int r = 0; r < kRowBlock; ++r)
      for (int j = 0; j < kKeyTile; ++j) acc[r][j] = 0.0f;
    for (int64_t c = 0; c < d; ++c) {
      const float* k = tile + c * kKeyTile;
      for (int r = 0; r < kRowBlock; ++r) {
        const float qv = q[r * d + c];
#pragma omp simd
        for (int j = 0; j < kKeyTile; ++j) acc[r][j] += qv * k[j];
      }
    }
    for (int r = 0; r < kRowBlock; ++r) std::memcpy(logits[r] + j0, acc[r], n * sizeof(float));
  }
}

// Softmax of one logits row (in place, as probabilities times its sum) and colsum += p.
HIPPO_CLONES void softmax_into_colsum(float* row, int64_t n, float* colsum) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, row[j]);
  float z = 0.0f;
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_nonpositive(row[j] - m);
    row[j] = e;
    z += e;
  }
  const float inv = 1.0f / z;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) colsum[j] += row[j] * inv;
}

// Grow-only buffers kept between calls, per calling thread (one capture runs at a time per
// process; the slot numbers are the buffers of one call).
float* scratch(size_t slot, int64_t floats) {
  thread_local std::vector<std::vector<float>> buffers;
  if (buffers.size() <= slot) buffers.resize(slot + 1);
  if (static_cast<int64_t>(buffers[slot].size()) < floats) buffers[slot].resize(floats);
  return buffers[slot].data();
}

template <typename T>
struct KeyDecoder {
  float scale;
  float operator()(const T* base, int64_t i) const { return static_cast<float>(base[i]) * scale; }
};

struct Fp8Decoder {
  const float* table;  // 256 entries, the format's values times the key scale
  float operator()(const uint8_t* base, int64_t i) const { return table[base[i]]; }
};

std::array<float, 256> fp8_table(int64_t format, float k_scale) {
  std::array<float, 256> table{};
  for (int b = 0; b < 256; ++b) {
    const float v = format == E4M3
        ? static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()))
        : static_cast<float>(c10::Float8_e5m2(static_cast<uint8_t>(b), c10::Float8_e5m2::from_bits()));
    table[b] = v * k_scale;
  }
  return table;
}

// dst[c * kKeyTile + j] = channel c of key j, for n keys at token offsets [off0, off0 + n).
template <int64_t kLayout, typename T, typename Decode>
void unpack_run(const T* region, const KeyCacheGeometry& g, int64_t off0, int64_t n, Decode decode, float* out) {
  for (int64_t c = 0; c < g.head_dim; ++c) {
    float* dst = out + c * kKeyTile;
    if constexpr (kLayout == TRANSPOSED) {
      const int64_t at = c * g.block_size + off0;
      for (int64_t j = 0; j < n; ++j) dst[j] = decode(region, at + j);
    } else if constexpr (kLayout == ROWS) {
      const int64_t at = off0 * g.token_stride + c * g.channel_stride;
      for (int64_t j = 0; j < n; ++j) dst[j] = decode(region, at + j * g.token_stride);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t off = off0 + j;
        dst[j] = decode(region, ((off / 16) * (g.head_dim / 2) + c / 2) * 32 + (off % 16) * 2 + (c % 2));
      }
    }
  }
}

// The panel's columns [j0, j0 + n) = the n keys at token offsets [off0, off0 + n) of one
// (block, kv head), dequantised. Loops run along the keys, contiguous in the panel.
template <int64_t kLayout, typename T, typename Decode>
void unpack_segment(const T* region, const KeyCacheGeometry& g, int64_t off0, int64_t n, Decode decode,
                    float* panel, int64_t j0) {
  // Split at key tiles, so each piece is a contiguous run of one panel row.
  for (int64_t piece = 0; piece < n;) {
    const int64_t j = j0 + piece;
    const int64_t m = std::min(n - piece, kKeyTile - j % kKeyTile);
    unpack_run<kLayout>(region, g, off0 + piece, m, decode,
                        panel + (j / kKeyTile) * g.head_dim * kKeyTile + j % kKeyTile);
    piece += m;
  }
}

// The video's keys of kv head `head` into the tile-major panel: one segment per run of keys in a block.
template <typename T, typename Decode>
void unpack_keys(const T* cache, const KeyCacheGeometry& g, int64_t head, const std::vector<int64_t>& seg_block,
                 const std::vector<int64_t>& seg_off, const std::vector<int64_t>& seg_key, int64_t num_keys,
                 Decode decode, float* panel) {
  const int64_t segments = static_cast<int64_t>(seg_block.size());
  at::parallel_for(0, segments, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t n = (s + 1 < segments ? seg_key[s + 1] : num_keys) - seg_key[s];
      const T* region = cache + seg_block[s] * g.block_stride + head * g.head_stride;
      if (g.layout == TRANSPOSED)
        unpack_segment<TRANSPOSED>(region, g, seg_off[s], n, decode, panel, seg_key[s]);
      else if (g.layout == ROWS)
        unpack_segment<ROWS>(region, g, seg_off[s], n, decode, panel, seg_key[s]);
      else
        unpack_segment<VNNI16>(region, g, seg_off[s], n, decode, panel, seg_key[s]);
    }
  });
}

template <typename T, typename Decode>
void colsum_impl(const float* q, int64_t num_rows, int64_t num_q_heads, int64_t num_kv_heads,
                 const T* cache, const KeyCacheGeometry& g, const std::vector<int64_t>& seg_block,
                 const std::vector<int64_t>& seg_off, const std::vector<int64_t>& seg_key, int64_t num_keys,
                 Decode decode, float* out) {
  const int64_t d = g.head_dim, group = num_q_heads / num_kv_heads;
  const int64_t rows_per_head = group * num_rows;
  const int64_t num_tasks = (rows_per_head + kTaskRows - 1) / kTaskRows;
  const int64_t threads = at::get_num_threads();
  // Tile-major [tiles][d][kKeyTile]; the last tile's unused keys are zero (their logits are
  // dropped). Buffers are kept between calls: fresh pages of a long video's panel cost more
  // page faults than the kernel's arithmetic.
  const int64_t padded = ((num_keys + kKeyTile - 1) / kKeyTile) * kKeyTile;
  float* panel = scratch(0, padded * d);
  std::fill(panel + (padded - kKeyTile) * d, panel + padded * d, 0.0f);
  float* colsums = scratch(1, threads * num_keys);
  std::fill(colsums, colsums + threads * num_keys, 0.0f);
  std::vector<float*> logits_of(threads);
  for (int64_t t = 0; t < threads; ++t) logits_of[t] = scratch(2 + t, kRowBlock * num_keys);
  for (int64_t head = 0; head < num_kv_heads; ++head) {
    unpack_keys(cache, g, head, seg_block, seg_off, seg_key, num_keys, decode, panel);
    at::parallel_for(0, num_tasks, 1, [&](int64_t lo, int64_t hi) {
      float* colsum = colsums + at::get_thread_num() * num_keys;
      float* logits = logits_of[at::get_thread_num()];
      std::vector<float> qblock(kRowBlock * d);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t row_end = std::min(rows_per_head, (task + 1) * kTaskRows);
        for (int64_t r0 = task * kTaskRows; r0 < row_end; r0 += kRowBlock) {
          const int64_t n = std::min<int64_t>(kRowBlock, row_end - r0);
          float* rows[kRowBlock];
          for (int r = 0; r < kRowBlock; ++r) {
            rows[r] = logits + r * num_keys;
            // Row index within the kv head's group: query row-major, heads of the group inner.
            const int64_t idx = r0 + std::min<int64_t>(r, n - 1);
            const int64_t row = idx / group, q_head = head * group + idx % group;
            std::memcpy(qblock.data() + r * d, q + (row * num_q_heads + q_head) * d, d * sizeof(float));
          }
          row_block_logits(qblock.data(), d, panel, num_keys, rows);
          for (int64_t r = 0; r < n; ++r) softmax_into_colsum(rows[r], num_keys, colsum);
        }
      }
    });
  }
  for (int64_t t = 0; t < threads; ++t) {
    const float* src = colsums + t * num_keys;
    for (int64_t j = 0; j < num_keys; ++j) out[j] += src[j];
  }
}

}  // namespace

// Adds to out[N_v] the softmax probabilities of every (text query row, head) pair over the
// video keys at positions [key_start, key_start + N_v) of the request (see the file comment).
void video_key_colsum(const torch::Tensor& query, const torch::Tensor& key_cache, int64_t layout,
                      int64_t fp8_format, const torch::Tensor& block_table, int64_t key_start,
                      int64_t num_keys, double scale, double k_scale, torch::Tensor& out) {
  TORCH_CHECK(query.device().is_cpu() && key_cache.device().is_cpu() && block_table.device().is_cpu() &&
                  out.device().is_cpu(),
              "video_key_colsum (CPU): every tensor must be on the CPU");
  TORCH_CHECK(query.dim() == 3, "query must be [L, H_q, d], got ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [blocks, H_kv, block_size, d], got ", key_cache.sizes());
  TORCH_CHECK(layout == ROWS || layout == TRANSPOSED || layout == VNNI16, "layout must be 0, 1 or 2, got ", layout);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == num_keys,
              "out must be a contiguous float32 [", num_keys, "], got ", out.sizes(), " ", out.scalar_type());
  const int64_t num_kv_heads = key_cache.size(1), block_size = key_cache.size(2), d = key_cache.size(3);
  TORCH_CHECK(query.size(2) == d, "query d=", query.size(2), " but the key cache has d=", d);
  TORCH_CHECK(query.size(1) % num_kv_heads == 0, "query heads ", query.size(1),
              " must be a multiple of the cache's kv heads ", num_kv_heads);
  TORCH_CHECK(layout != VNNI16 || (block_size % 16 == 0 && d % 2 == 0),
              "the VNNI16 layout needs block_size % 16 == 0 and even d, got ", block_size, ", ", d);
  TORCH_CHECK(num_keys > 0 && key_start >= 0, "need num_keys > 0 and key_start >= 0");
  const int64_t last_block = (key_start + num_keys - 1) / block_size;
  TORCH_CHECK(block_table.dim() == 1 && block_table.numel() > last_block, "block_table must be 1-D with more than ",
              last_block, " entries, got ", block_table.sizes());
  if (query.size(0) == 0) return;

  const KeyCacheGeometry g{key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3),
                           block_size, d, layout};
  if (layout != ROWS)
    TORCH_CHECK(key_cache.stride(2) == d && key_cache.stride(3) == 1,
                "packed layouts need the backend's [blocks, H_kv, block_size, d] view with contiguous blocks");
  const torch::Tensor table = block_table.to(at::kLong);
  const int64_t* blocks = table.data_ptr<int64_t>();
  const int64_t num_cache_blocks = key_cache.size(0);
  // Runs of consecutive positions inside one block: (block id, first offset, first key index).
  std::vector<int64_t> seg_block, seg_off, seg_key;
  for (int64_t j = 0; j < num_keys;) {
    const int64_t pos = key_start + j, block = blocks[pos / block_size], off = pos % block_size;
    TORCH_CHECK(block >= 0 && block < num_cache_blocks, "block id ", block, " of position ", pos,
                " is outside the cache's ", num_cache_blocks, " blocks");
    seg_block.push_back(block);
    seg_off.push_back(off);
    seg_key.push_back(j);
    j += std::min(block_size - off, num_keys - j);
  }
  const torch::Tensor q = (query.to(at::kFloat) * scale).contiguous();
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rows = query.size(0), heads = query.size(1);
  const auto st = key_cache.scalar_type();
  if (fp8_format != NOT_FP8 || st == at::kFloat8_e4m3fn || st == at::kFloat8_e5m2) {
    const int64_t format = st == at::kFloat8_e4m3fn ? E4M3 : st == at::kFloat8_e5m2 ? E5M2 : fp8_format;
    TORCH_CHECK(format == E4M3 || format == E5M2, "fp8_format must be 1 (e4m3) or 2 (e5m2), got ", fp8_format);
    TORCH_CHECK(key_cache.element_size() == 1, "an fp8 key cache must hold bytes, got ", st);
    const auto lut = fp8_table(format, static_cast<float>(k_scale));
    const auto* base = static_cast<const uint8_t*>(key_cache.data_ptr());
    colsum_impl(qp, rows, heads, num_kv_heads, base, g, seg_block, seg_off, seg_key, num_keys,
                Fp8Decoder{lut.data()}, op);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "video_key_colsum", [&] {
    colsum_impl(qp, rows, heads, num_kv_heads, key_cache.data_ptr<scalar_t>(), g, seg_block, seg_off,
                seg_key, num_keys, KeyDecoder<scalar_t>{1.0f}, op);
  });
}

}  // namespace hippo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hippo_vllm CPU kernels: s_attn from vLLM's paged KV cache";
  m.def("video_key_colsum", &hippo::video_key_colsum,
        "Add the text->video softmax probabilities, summed over (query row, head), into out",
        py::arg("query"), py::arg("key_cache"), py::arg("layout"), py::arg("fp8_format"), py::arg("block_table"),
        py::arg("key_start"), py::arg("num_keys"), py::arg("scale"), py::arg("k_scale"), py::arg("out"));
}
