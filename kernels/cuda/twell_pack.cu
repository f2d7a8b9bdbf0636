// TwELL pack: ReLU + tile-wise ELLPACK packing of a dense gate matrix G [n_rows, d_ff].
//
// For every row r and column tile k of TW_TILE columns:
//   counts[r, k]        = number of columns c in the tile with G[r, c] > 0 (the TRUE count)
//   slots[r, k, 0..S-1] = (bits(G[r, c]) << 16) | (c - k * TW_TILE), in ascending c, for the first
//                         min(count, S) active columns (S = TW_SLOTS).
// A tile with count > S overflows: its slots are incomplete, the consumer reads the dense row of G
// instead (exact), and stats[0] += 1, stats[1] += count. Nothing is dropped or wrapped.
// row_total (optional, zeroed by the caller) receives each row's total active count.
//
// One warp per (row, tile) task, TW_PACK_UNR tasks per warp with all loads issued first. Each lane
// reads 8 consecutive elements (16 bytes) of every 256-column chunk.
#include "twell_common.cuh"

#ifndef TW_PACK_UNR
#define TW_PACK_UNR 4
#endif
#define TW_PACK_BLOCK 256

extern "C" __global__ void __launch_bounds__(TW_PACK_BLOCK)
twell_pack(const tw_u16* __restrict__ gate, int* __restrict__ counts, tw_u32* __restrict__ slots,
           int* __restrict__ stats, int* __restrict__ row_total, int n_rows, int d_ff) {
  constexpr int R = TW_TILE / 256;  // 256-column chunks per tile
  constexpr int U = TW_PACK_UNR;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nt = (d_ff + TW_TILE - 1) / TW_TILE;
  const long long n_tasks = (long long)n_rows * nt;
  const long long task0 = ((long long)blockIdx.x * (TW_PACK_BLOCK / 32) + warp) * U;
  if (task0 >= n_tasks) return;
  const tw_u64 pol = tw_policy_stream();

  uint4 gv[U][R];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const long long task = task0 + u;
    const long long row = task / nt;
    const int k = (int)(task - row * nt);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int col = k * TW_TILE + r * 256 + lane * 8;
      if (task < n_tasks && col < d_ff)  // d_ff % 8 == 0: a vector is wholly in or out
        gv[u][r] = tw_ld16(gate + row * d_ff + col, pol);
      else
        gv[u][r] = make_uint4(0u, 0u, 0u, 0u);
    }
  }

#pragma unroll
  for (int u = 0; u < U; ++u) {
    const long long task = task0 + u;
    if (task >= n_tasks) break;  // warp-uniform
    tw_u32* sp = slots + task * TW_SLOTS;
    int n = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const unsigned m = tw_positive_mask8(gv[u][r]);
      const int cnt = __popc(m);
      const int incl = tw_warp_scan(cnt, lane);
      const int tot = __shfl_sync(TW_FULL_MASK, incl, 31);
      int o = n + incl - cnt;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (m & (1u << e)) {
          if (o < TW_SLOTS)
            sp[o] = (tw_elem_bits(gv[u][r], e) << 16) | (tw_u32)(r * 256 + lane * 8 + e);
          ++o;
        }
      }
      n += tot;
    }
    if (lane == 0) {
      counts[task] = n;
      if (row_total != nullptr && n > 0) atomicAdd(row_total + task / nt, n);
      if (n > TW_SLOTS) {
        atomicAdd(stats, 1);
        atomicAdd(stats + 1, n);
      }
    }
  }
}
