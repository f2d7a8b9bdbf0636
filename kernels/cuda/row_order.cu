// Longest-first row order for the warp-per-token kernels (hy_forward / hy_dx in hybrid.cu, the fused
// TwELL stage in twell_ffn.cu): `order` lists the rows by length, longest first, ties in row order,
// and `split` counts the rows of at least `threshold` (the long rows those kernels split).
//
// Lengths are bucketed, exactly below 64 and in 16 steps per octave above (within 6.25%), which is
// all the scheduling needs; so a counting sort does it in two launches, where torch.argsort ran a
// radix sort of four kernels plus a cast and a reduction for the split count:
//   ro_count    per chunk of RO_CHUNK rows: its histogram of bucket keys and its rows >= threshold
//   ro_scatter  per chunk: each bucket's first slot from all histograms, then the chunk's rows in
//               row order within each bucket (warp match + per-warp counts), and the split total
// No CUDA headers: compiles with NVRTC (CuPy) and nvcc alike.

#include "twell_common.cuh"  // tw_warp_scan

constexpr int RO_BUCKETS = 256;
constexpr int RO_CHUNK = 1024;               // rows per CTA, one per thread
constexpr int RO_WARPS = RO_CHUNK / 32;
constexpr int RO_ROW = RO_BUCKETS + 1;       // a chunk's histogram row: the buckets, then its split count

// 0 for the longest lengths ... RO_BUCKETS - 1 for length 0 (ascending keys = longest first).
// Bucket: the length below 64; above, 64 + 16 (octave - 6) + the 4 bits after the leading one.
__device__ __forceinline__ int ro_key(int len) {
  int bucket = len < 0 ? 0 : len;
  if (len >= 64) {
    const int e = 31 - __clz(len);
    bucket = 64 + (e - 6) * 16 + ((len >> (e - 4)) & 15);
  }
  return RO_BUCKETS - 1 - (bucket < RO_BUCKETS ? bucket : RO_BUCKETS - 1);
}

extern "C" __global__ void __launch_bounds__(RO_CHUNK, 1)
ro_count(const int* __restrict__ lengths, long long stride, int n, int threshold, int* __restrict__ hist) {
  __shared__ int s_hist[RO_BUCKETS];
  __shared__ int s_split;
  const int tid = threadIdx.x;
  if (tid < RO_BUCKETS) s_hist[tid] = 0;
  if (tid == 0) s_split = 0;
  __syncthreads();
  const int r = blockIdx.x * RO_CHUNK + tid;
  const int len = r < n ? __ldg(lengths + r * stride) : 0;
  if (r < n) atomicAdd(&s_hist[ro_key(len)], 1);
  const unsigned long_rows = __ballot_sync(TW_FULL_MASK, r < n && len >= threshold);
  if ((tid & 31) == 0 && long_rows) atomicAdd(&s_split, __popc(long_rows));
  __syncthreads();
  int* out = hist + (size_t)blockIdx.x * RO_ROW;
  if (tid < RO_BUCKETS) out[tid] = s_hist[tid];
  if (tid == 0) out[RO_BUCKETS] = s_split;
}

extern "C" __global__ void __launch_bounds__(RO_CHUNK, 1)
ro_scatter(const int* __restrict__ lengths, long long stride, int n, const int* __restrict__ hist,
           int* __restrict__ order, int* __restrict__ split) {
  __shared__ int s_cnt[RO_WARPS][RO_BUCKETS];  // rows per (warp, bucket), then the first slot of each
  __shared__ int s_warp_total[RO_BUCKETS / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int chunk = blockIdx.x, chunks = gridDim.x;
  for (int i = tid; i < RO_WARPS * RO_BUCKETS; i += RO_CHUNK) (&s_cnt[0][0])[i] = 0;
  // bucket tid: rows in all chunks, and rows in the chunks before this one
  int total = 0, before = 0;
  if (tid < RO_BUCKETS) {
    for (int c = 0; c < chunks; ++c) {
      const int v = __ldg(hist + (size_t)c * RO_ROW + tid);
      total += v;
      before += c < chunk ? v : 0;
    }
  }
  const int incl = tw_warp_scan(total, lane);
  if (tid < RO_BUCKETS && lane == 31) s_warp_total[warp] = incl;
  if (chunk == 0 && tid == RO_BUCKETS) {
    int s = 0;
    for (int c = 0; c < chunks; ++c) s += __ldg(hist + (size_t)c * RO_ROW + RO_BUCKETS);
    *split = s;
  }
  const int r = chunk * RO_CHUNK + tid;
  const int key = r < n ? ro_key(__ldg(lengths + r * stride)) : -1;
  const unsigned same = __match_any_sync(TW_FULL_MASK, key);
  const int rank = __popc(same & ((1u << lane) - 1u));  // earlier rows of the warp in the same bucket
  __syncthreads();  // s_cnt zeroed, s_warp_total written
  if (key >= 0 && rank == 0) s_cnt[warp][key] = __popc(same);
  __syncthreads();
  if (tid < RO_BUCKETS) {
    int slot = incl - total + before;  // rows of longer buckets (this warp's part of the scan) + earlier chunks
    for (int w = 0; w < warp; ++w) slot += s_warp_total[w];
    for (int w = 0; w < RO_WARPS; ++w) {
      const int c = s_cnt[w][tid];
      s_cnt[w][tid] = slot;
      slot += c;
    }
  }
  __syncthreads();
  if (key >= 0) order[s_cnt[warp][key] + rank] = r;
}
