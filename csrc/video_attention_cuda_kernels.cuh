// CUDA kernels of video_key_colsum (see video_attention_cpu.cpp for the contract). Kept free
// of torch headers, so nvcc alone can compile them (csrc/check_cuda_kernels.cu).
//
// Two passes over the video keys, each block owning a tile of kKeyTile keys of one kv head:
//   1. row statistics: per (query row, head) pair, the tile's maximum logit and the sum of
//      exponentials below it, combined over tiles into the row's max and softmax normaliser;
//   2. column sums: the logits again, exp(l - max) / Z summed over the pairs of the group,
//      added into out[key] (one atomic add per key and kv head).
// Keys are read once per pass straight from the paged cache and dequantised in shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "key_layouts.h"

namespace hippo {
namespace cuda {

constexpr int kKeyTile = 64;
constexpr int kRowChunk = 16;
constexpr int kThreads = 256;  // kKeyTile keys x 4 row lanes

__device__ __forceinline__ float load_key(const float* p, int64_t i, float) { return p[i]; }
__device__ __forceinline__ float load_key(const __half* p, int64_t i, float) { return __half2float(p[i]); }
__device__ __forceinline__ float load_key(const __nv_bfloat16* p, int64_t i, float) {
  return __bfloat162float(p[i]);
}

struct Fp8Key {
  uint8_t bits;
};

// fp8 bytes -> float, times the layer's key scale (format: 1 = e4m3fn, 2 = e5m2).
__device__ __forceinline__ float fp8_to_float(uint8_t b, int64_t format) {
  const float sign = (b & 0x80) ? -1.0f : 1.0f;
  if (format == E4M3) {
    const int e = (b >> 3) & 0xF, m = b & 0x7;
    if (e == 0xF && m == 0x7) return __int_as_float(0x7fc00000);
    return sign * (e == 0 ? ldexpf(static_cast<float>(m), -9) : ldexpf(static_cast<float>(8 + m), e - 10));
  }
  const int e = (b >> 2) & 0x1F, m = b & 0x3;
  if (e == 0x1F) return m == 0 ? sign * __int_as_float(0x7f800000) : __int_as_float(0x7fc00000);
  return sign * (e == 0 ? ldexpf(static_cast<float>(m), -16) : ldexpf(static_cast<float>(4 + m), e - 17));
}

struct Problem {
  const float* q;            // [L, H_q, d], already times the logit scale
  const int64_t* block_table;
  KeyCacheGeometry g;
  int64_t num_rows, num_q_heads, num_kv_heads, key_start, num_keys;
  int64_t fp8_format;
  float k_scale;
  float* row_max_partial;    // [tiles, H_q * L]
  float* row_sum_partial;    // [tiles, H_q * L]
  const float* row_max;      // [H_q * L] (pass 2)
  const float* row_inv_sum;  // [H_q * L] (pass 2)
  float* out;                // [N_v]
};

template <typename T>
__device__ void load_key_tile(const T* cache, const Problem& p, int64_t head, int64_t tile, float* keys, int ld) {
  const int64_t d = p.g.head_dim;
  for (int64_t i = threadIdx.x; i < kKeyTile * d; i += blockDim.x) {
    const int64_t j = i / d, c = i % d, key = tile * kKeyTile + j;
    float v = 0.0f;
    if (key < p.num_keys) {
      const int64_t pos = p.key_start + key;
      const int64_t block = p.block_table[pos / p.g.block_size];
      const int64_t at = key_offset(p.g, block, head, pos % p.g.block_size, c);
      if constexpr (sizeof(T) == 1) {
        v = fp8_to_float(reinterpret_cast<const uint8_t*>(cache)[at], p.fp8_format) * p.k_scale;
      } else {
        v = load_key(cache, at, p.k_scale);
      }
    }
    keys[j * ld + c] = v;
  }
}

// Shared memory: keys [kKeyTile][d + 1], queries [kRowChunk][d], logits [kRowChunk][kKeyTile].
template <typename T, bool kSecondPass>
__global__ void __launch_bounds__(kThreads) colsum_pass(const T* cache, Problem p) {
  extern __shared__ float smem[];
  const int64_t d = p.g.head_dim, ld = d + 1;
  const int64_t tile = blockIdx.x, head = blockIdx.y;
  const int64_t group = p.num_q_heads / p.num_kv_heads, rows = group * p.num_rows;
  float* keys = smem;
  float* queries = keys + kKeyTile * ld;
  float* logits = queries + kRowChunk * d;
  load_key_tile(cache, p, head, tile, keys, static_cast<int>(ld));
  const int j = threadIdx.x % kKeyTile, lane = threadIdx.x / kKeyTile;
  const int64_t key = tile * kKeyTile + j;
  float colsum = 0.0f;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < kRowChunk * d; i += blockDim.x) {
      const int64_t r = r0 + i / d;
      // Pair index r within the group: query row r / group, query head head * group + r % group.
      queries[i] = r < rows ? p.q[((r / group) * p.num_q_heads + head * group + r % group) * d + i % d] : 0.0f;
    }
    __syncthreads();
    for (int rr = lane; rr < kRowChunk; rr += kThreads / kKeyTile) {
      float acc = 0.0f;
      for (int64_t c = 0; c < d; ++c) acc += queries[rr * d + c] * keys[j * ld + c];
      const int64_t r = r0 + rr;
      const bool valid = key < p.num_keys && r < rows;
      if (kSecondPass) {
        if (valid) {
          const int64_t pair = (head * group + r % group) * p.num_rows + r / group;
          colsum += __expf(acc - p.row_max[pair]) * p.row_inv_sum[pair];
        }
      } else {
        logits[rr * kKeyTile + j] = valid ? acc : -INFINITY;
      }
    }
    if (!kSecondPass) {
      __syncthreads();
      if (threadIdx.x < kRowChunk && r0 + threadIdx.x < rows) {
        const float* row = logits + threadIdx.x * kKeyTile;
        float m = -INFINITY;
        for (int k = 0; k < kKeyTile; ++k) m = fmaxf(m, row[k]);
        float s = 0.0f;
        for (int k = 0; k < kKeyTile; ++k) s += m == -INFINITY ? 0.0f : __expf(row[k] - m);
        const int64_t r = r0 + threadIdx.x;
        const int64_t pair = (head * group + r % group) * p.num_rows + r / group;
        p.row_max_partial[tile * p.num_q_heads * p.num_rows + pair] = m;
        p.row_sum_partial[tile * p.num_q_heads * p.num_rows + pair] = s;
      }
    }
  }
  if (kSecondPass) {
    __syncthreads();
    logits[threadIdx.x] = colsum;  // kThreads <= kRowChunk * kKeyTile
    __syncthreads();
    if (lane == 0 && key < p.num_keys) {
      float total = 0.0f;
      for (int l = 0; l < kThreads / kKeyTile; ++l) total += logits[l * kKeyTile + j];
      atomicAdd(p.out + key, total);
    }
  }
}

// Per pair: combine the tiles' (max, sum) into the row max and 1 / Z.
__global__ void combine_rows(Problem p, int64_t tiles, float* row_max, float* row_inv_sum) {
  const int64_t pairs = p.num_q_heads * p.num_rows;
  const int64_t pair = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pair >= pairs) return;
  float m = -INFINITY;
  for (int64_t t = 0; t < tiles; ++t) m = fmaxf(m, p.row_max_partial[t * pairs + pair]);
  float s = 0.0f;
  for (int64_t t = 0; t < tiles; ++t) {
    const float mt = p.row_max_partial[t * pairs + pair];
    if (mt != -INFINITY) s += p.row_sum_partial[t * pairs + pair] * __expf(mt - m);
  }
  row_max[pair] = m;
  row_inv_sum[pair] = 1.0f / s;
}

inline size_t shared_bytes(int64_t d) {
  return sizeof(float) * (kKeyTile * (d + 1) + kRowChunk * d + kRowChunk * kKeyTile);
}

// Runs the three kernels on `stream`; scratch holds 2 * tiles * pairs + 2 * pairs floats.
template <typename T>
void launch(const T* cache, Problem p, float* scratch, cudaStream_t stream) {
  const int64_t tiles = (p.num_keys + kKeyTile - 1) / kKeyTile, pairs = p.num_q_heads * p.num_rows;
  p.row_max_partial = scratch;
  p.row_sum_partial = scratch + tiles * pairs;
  float* row_max = scratch + 2 * tiles * pairs;
  float* row_inv_sum = row_max + pairs;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.num_kv_heads));
  const size_t smem = shared_bytes(p.g.head_dim);
  cudaFuncSetAttribute(colsum_pass<T, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  cudaFuncSetAttribute(colsum_pass<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  colsum_pass<T, false><<<grid, kThreads, smem, stream>>>(cache, p);
  combine_rows<<<static_cast<unsigned>((pairs + 255) / 256), 256, 0, stream>>>(p, tiles, row_max, row_inv_sum);
  p.row_max = row_max;
  p.row_inv_sum = row_inv_sum;
  colsum_pass<T, true><<<grid, kThreads, smem, stream>>>(cache, p);
}

}  // namespace cuda
}  // namespace hippo
