// Where a video key lives in vLLM's paged KV cache, for each layout the attention
// backends write. Shared by the CPU and CUDA kernels (host and device code).
//
// The key cache is passed as the backend's own 4-D view [blocks, kv_heads, block_size, d]
// (strides in elements). Within one (block, kv head) the backends store keys as:
//   ROWS        token-major rows of d channels, any strides (FlashAttention / Triton:
//               the key half of [blocks, kv_heads, block_size, 2d]);
//   TRANSPOSED  d rows of block_size tokens, contiguous (vLLM's CPU kernel, "vec"/"vec16");
//   VNNI16      [block_size/16, d/2, 16, 2], contiguous (vLLM's CPU kernel, "amx": bf16
//               or fp8 pairs packed for AMX tiles).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HIPPO_HD __host__ __device__ __forceinline__
#else
#define HIPPO_HD inline
#endif

namespace hippo {

enum KeyLayout : int64_t { ROWS = 0, TRANSPOSED = 1, VNNI16 = 2 };
enum Fp8Format : int64_t { NOT_FP8 = 0, E4M3 = 1, E5M2 = 2 };

struct KeyCacheGeometry {
  int64_t block_stride, head_stride, token_stride, channel_stride;
  int64_t block_size, head_dim;
  int64_t layout;
};

// Element offset of channel c of the key at (block, kv head, token offset in the block).
HIPPO_HD int64_t key_offset(const KeyCacheGeometry& g, int64_t block, int64_t head, int64_t off,
                            int64_t c) {
  const int64_t base = block * g.block_stride + head * g.head_stride;
  if (g.layout == ROWS) return base + off * g.token_stride + c * g.channel_stride;
  if (g.layout == TRANSPOSED) return base + c * g.block_size + off;
  // VNNI16: groups of 16 tokens; inside one, channel pairs of 16 tokens x 2 channels.
  return base + ((off / 16) * (g.head_dim / 2) + c / 2) * 32 + (off % 16) * 2 + (c % 2);
}

}  // namespace hippo
