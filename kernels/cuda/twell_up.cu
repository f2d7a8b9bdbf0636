// Token-blocked sparse up-projection of the gated TwELL fused stage:
//
//   h[t, j] = g[t, j] * (x[t] . Wu[j])   for every stored slot (t, j) of a tile that does not overflow,
//
// written as (bits16(h) << 16) | column into `out` (which may be `slots` itself). The fused stage
// then takes h straight from the slots (twell_ffn.cu with TW_HSLOTS 1) and streams only Wd^T rows.
//
// Why blocked: the per-token fused kernel reads one Wu row per active (token, unit) pair from L2.
// B tokens with k active units each touch only U = d_ff (1 - exp(-B k / d_ff)) distinct units (4127
// for 7424 pairs at B 256, k 29, d_ff 5632), so a CTA that owns B tokens and walks their pairs unit
// by unit reads each Wu row once per block: 1.8x fewer bytes at k 29, 3x at k 61.
//
// One CTA per block of TU_TOKENS consecutive tokens; the block's tokens are taken in sub-rounds
// of as many tokens as `pair_cap` pairs allow (all of them unless rows are heavy). A sub-round:
//  1. rows (token, tile) of non-overflowing tiles: an exclusive scan of their counts; the slots are
//     read (16-byte loads, a thread per row) into a raw list, with a histogram over the units
//  2. the histogram's scan places every pair in unit order (key = unit << 16 | token << 8 | slot)
//  3. for each slice of 128 d_model columns: the sub-round's x rows are staged in shared memory;
//     8-lane groups walk equal, contiguous ranges of the sorted pairs, TU_AHEAD pairs a batch, and
//     load a unit's Wu slice only where the unit changes, one batch ahead of its use; the slice's
//     partial dot product is added to the pair's float32 sum
//  4. h = g * u is written back per pair.
// The overflowing tiles are not touched: the fused stage computes them from the dense gate rows.
#include "twell_common.cuh"

#ifndef TW_DMODEL
#define TW_DMODEL 2048
#endif
#ifndef TU_TOKENS
#define TU_TOKENS 256  // tokens per block
#endif
#ifndef TU_THREADS
#define TU_THREADS 512
#endif
#ifndef TU_AHEAD
#define TU_AHEAD 4  // pairs a batch (a batch's Wu slices load while the previous batch runs)
#endif

namespace twu {
constexpr int DM = TW_DMODEL;
constexpr int VPL = (DM % 128 == 0) ? 2 : 1;  // 16-byte vectors per lane per slice
constexpr int COLS = 64 * VPL;                // d_model columns per slice: 8 lanes x VPL x 8
constexpr int VROW = COLS / 8;                // 16-byte vectors in a staged x row
constexpr int NSLICE = DM / COLS;
constexpr int B = TU_TOKENS;
constexpr int NT = TU_THREADS;
constexpr int WARPS = NT / 32;
constexpr int GROUPS = NT / 8;
constexpr int A = TU_AHEAD;
constexpr int S = TW_SLOTS;
constexpr int T = TW_TILE;
static_assert(DM % 64 == 0, "d_model must be a multiple of 64");
static_assert(B >= 1 && B <= 256, "a token's index in its block travels in 8 bits");
static_assert(S % 4 == 0 && S <= 256, "slots are read 4 at a time and travel in 8 bits");
static_assert(NT % 32 == 0 && NT >= 64 && NT <= 1024, "TU_THREADS must be whole warps");
static_assert(A >= 1 && A <= 8, "TU_AHEAD in [1, 8]");
}  // namespace twu

// In-place exclusive scan of a[0, n) over the CTA; returns the total. All threads call it.
__device__ int tu_block_scan(int* a, int n, int* warp_sums) {
  using namespace twu;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = (n + NT - 1) / NT;
  __syncthreads();  // a[] was just written by other threads
  const int begin = min(n, tid * per), end = min(n, begin + per);
  int mine = 0;
  for (int i = begin; i < end; ++i) mine += a[i];
  const int incl = tw_warp_scan(mine, lane);
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int v = lane < WARPS ? warp_sums[lane] : 0;
    const int w = tw_warp_scan(v, lane);
    if (lane < WARPS) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  int run = incl - mine + (warp > 0 ? warp_sums[warp - 1] : 0);
  for (int i = begin; i < end; ++i) {
    const int c = a[i];
    a[i] = run;
    run += c;
  }
  const int total = warp_sums[WARPS - 1];
  __syncthreads();
  return total;
}

__device__ __forceinline__ float tu_dot8(const uint4& a, const uint4& b) {
  float s = tw_lo(a.x) * tw_lo(b.x);
  float r = tw_hi(a.x) * tw_hi(b.x);
  s = fmaf(tw_lo(a.y), tw_lo(b.y), s);
  r = fmaf(tw_hi(a.y), tw_hi(b.y), r);
  s = fmaf(tw_lo(a.z), tw_lo(b.z), s);
  r = fmaf(tw_hi(a.z), tw_hi(b.z), r);
  s = fmaf(tw_lo(a.w), tw_lo(b.w), s);
  r = fmaf(tw_hi(a.w), tw_hi(b.w), r);
  return s + r;
}

// Shared memory (dynamic, 16-byte aligned pieces), sizes as twell.py's up_shared_bytes:
//   xs [B][VROW] uint4 | rows [B * nt + 1] int | tok [B + 1] int | hist [d_ff + 1] int |
//   keys [pair_cap] u32 | vals [pair_cap] (the raw list, then the float32 sums)
__device__ __forceinline__ int tu_round4(int n) { return (n + 3) & ~3; }

extern "C" __global__ void __launch_bounds__(TU_THREADS, 1)
twell_up_blocked(const tw_u16* __restrict__ x,     // [n_tokens, d_model]
                 const int* __restrict__ counts,   // [n_tokens, nt]
                 const tw_u32* slots,              // [n_tokens, nt, S]: (bits(g) << 16) | column
                 const tw_u16* __restrict__ w_up,  // [d_ff, d_model]
                 tw_u32* out,                      // [n_tokens, nt, S]: (bits(h) << 16) | column; may alias slots
                 int n_tokens, int d_ff, int pair_cap) {
  using namespace twu;
  extern __shared__ uint4 smem[];
  __shared__ int s_warp[WARPS];
  __shared__ int s_round[2];  // sub-round: last token (exclusive), pair count

  const int nt = (d_ff + T - 1) / T;
  const int tid = threadIdx.x, lane = tid & 31;
  const long long t0 = (long long)blockIdx.x * B;
  const int nb = (int)min((long long)B, (long long)n_tokens - t0);
  if (nb <= 0) return;

  uint4* xs = smem;
  int* rows = reinterpret_cast<int*>(xs + B * VROW);
  int* tok = rows + tu_round4(B * nt + 1);
  int* hist = tok + tu_round4(B + 1);
  tw_u32* keys = reinterpret_cast<tw_u32*>(hist + tu_round4(d_ff + 1));
  tw_u32* raw = keys + pair_cap;
  float* sums = reinterpret_cast<float*>(raw);
  const tw_u64 pol_keep = tw_policy_keep();
  const tw_u64 pol_stream = tw_policy_stream();

  // Stored pairs per row (0 for overflowing tiles) and per token.
  const int nrows = nb * nt;
  for (int r = tid; r < nrows; r += NT) {
    const int c = __ldg(counts + t0 * nt + r);
    rows[r] = c <= S ? c : 0;
  }
  __syncthreads();
  for (int b = tid; b <= nb; b += NT) {
    int s = 0;
    for (int k = 0; b < nb && k < nt; ++k) s += rows[b * nt + k];
    tok[b] = s;
  }
  tu_block_scan(tok, nb + 1, s_warp);  // tok[b] = pairs before token b; tok[nb] = all of them

  for (int b_lo = 0; b_lo < nb;) {
    if (tid == 0) {  // as many tokens as the pair capacity holds (one token's nt * S always fits)
      int b_hi = b_lo + 1;
      while (b_hi < nb && tok[b_hi + 1] - tok[b_lo] <= pair_cap) ++b_hi;
      s_round[0] = b_hi;
      s_round[1] = tok[b_hi] - tok[b_lo];
    }
    for (int u = tid; u <= d_ff; u += NT) hist[u] = 0;
    __syncthreads();
    const int b_hi = s_round[0], npairs = s_round[1];
    const int r_lo = b_lo * nt, r_hi = b_hi * nt;

    // 1. raw list in row order, histogram over the units. rows[] of this sub-round become starts.
    tu_block_scan(rows + r_lo, r_hi - r_lo, s_warp);  // rows past r_hi keep their counts
    for (int r = r_lo + tid; r < r_hi; r += NT) {
      const int start = rows[r], c = (r + 1 < r_hi ? rows[r + 1] : npairs) - start;
      if (c == 0) continue;
      const int b = r / nt, k = r - b * nt;
      const uint4* sp = reinterpret_cast<const uint4*>(slots + ((unsigned long long)t0 * nt + r) * S);
      for (int v = 0; v * 4 < c; ++v) {
        const uint4 w = tw_ld16(sp + v, pol_stream);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int s = 4 * v + e;
          if (s < c) {
            const int unit = k * T + (int)(tw_word(w, e) & 0xFFFFu);
            raw[start + s] = ((tw_u32)unit << 16) | ((tw_u32)(b - b_lo) << 8) | (tw_u32)s;
            atomicAdd(hist + unit, 1);
          }
        }
      }
    }
    // 2. unit order
    tu_block_scan(hist, d_ff + 1, s_warp);
    for (int p = tid; p < npairs; p += NT) {
      const tw_u32 key = raw[p];
      keys[atomicAdd(hist + (key >> 16), 1)] = key;
    }
    __syncthreads();
    for (int p = tid; p < npairs; p += NT) sums[p] = 0.f;

    // 3. partial dot products, one d_model slice at a time
    const int group = tid >> 3, gl = tid & 7;
    const unsigned gmask = 0xFFu << (lane & 24);
    const int p0 = (int)((long long)npairs * group / GROUPS), p1 = (int)((long long)npairs * (group + 1) / GROUPS);
    const int nbr = b_hi - b_lo;
#pragma unroll 1
    for (int sl = 0; sl < NSLICE; ++sl) {
      __syncthreads();  // the previous slice's x rows are consumed (and the sums zeroed)
      for (int i = tid; i < nbr * VROW; i += NT) {
        const int b = i / VROW, v = i - b * VROW;
        xs[b * VROW + v] = tw_ld16(x + (t0 + b_lo + b) * DM + sl * COLS + v * 8, pol_stream);
      }
      __syncthreads();
      if (sl + 1 < NSLICE) {  // the next slice's rows on their way to L2 while this one is used
        constexpr int LINES = COLS * 2 / 128;
        for (int i = tid; i < nbr * LINES; i += NT) {
          const tw_u16* line = x + (t0 + b_lo + i / LINES) * DM + (sl + 1) * COLS + (i % LINES) * 64;
          asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
        }
      }
      // Batches of A pairs: the Wu slices of a batch's pairs were loaded while the previous batch
      // ran (only for a unit's first pair; the others copy the previous pair's registers), and the
      // A dot products and reductions are independent, so their latencies overlap.
      const tw_u16* wslice = w_up + sl * COLS + gl * 8;
      uint4 ring[A][VPL], w[A][VPL];
#pragma unroll
      for (int i = 0; i < A; ++i) {
        const int q = p0 + i;
        const bool load = q < p1 && (q == p0 || (keys[q] >> 16) != (keys[q - 1] >> 16));
#pragma unroll
        for (int v = 0; v < VPL; ++v) {
          ring[i][v] = load ? tw_ld16(wslice + (size_t)(keys[q] >> 16) * DM + v * 64, pol_keep) : make_uint4(0u, 0u, 0u, 0u);
          w[i][v] = make_uint4(0u, 0u, 0u, 0u);
        }
      }
      tw_u32 ucur = 0xFFFFFFFFu;
#pragma unroll 1
      for (int pb = p0; pb < p1; pb += A) {  // uniform within the 8-lane group
        tw_u32 key[A];
#pragma unroll
        for (int i = 0; i < A; ++i) key[i] = keys[min(pb + i, p1 - 1)];  // past p1: repeats, not stored
#pragma unroll
        for (int i = 0; i < A; ++i) {
          const bool first = (key[i] >> 16) != (i == 0 ? ucur : key[i - 1] >> 16);
#pragma unroll
          for (int v = 0; v < VPL; ++v) w[i][v] = first ? ring[i][v] : w[(i + A - 1) % A][v];
        }
        ucur = key[A - 1] >> 16;
#pragma unroll
        for (int i = 0; i < A; ++i) {  // the next batch's loads
          const int q = pb + A + i;
          if (q < p1) {
            const tw_u32 uq = keys[q] >> 16;
            if (uq != (keys[q - 1] >> 16)) {
#pragma unroll
              for (int v = 0; v < VPL; ++v) ring[i][v] = tw_ld16(wslice + (size_t)uq * DM + v * 64, pol_keep);
            }
          }
        }
        float d[A];
#pragma unroll
        for (int i = 0; i < A; ++i) {
          const uint4* xr = xs + ((key[i] >> 8) & 0xFFu) * VROW + gl;
          d[i] = 0.f;
#pragma unroll
          for (int v = 0; v < VPL; ++v) d[i] += tu_dot8(xr[v * 8], w[i][v]);
        }
#pragma unroll
        for (int o = 1; o < 8; o <<= 1) {
#pragma unroll
          for (int i = 0; i < A; ++i) d[i] += __shfl_xor_sync(gmask, d[i], o);
        }
        if (gl == 0) {
#pragma unroll
          for (int i = 0; i < A; ++i)
            if (pb + i < p1) sums[pb + i] += d[i];
        }
      }
    }
    __syncthreads();

    // 4. h = g * u into the slots
    for (int p = tid; p < npairs; p += NT) {
      const tw_u32 key = keys[p];
      const int unit = (int)(key >> 16), k = unit / T;
      const long long t = t0 + b_lo + ((key >> 8) & 0xFFu);
      const unsigned long long src = ((unsigned long long)t * nt + k) * S + (key & 0xFFu);
      const tw_u32 word = slots[src];
      const float h = tw_to_float(word >> 16) * sums[p];
      out[src] = (tw_pack2(h, 0.f) << 16) | (word & 0xFFFFu);
    }
    __syncthreads();  // keys, sums and hist are rebuilt by the next sub-round
    b_lo = b_hi;
  }
}
