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
//     each warp takes tiles of 16 consecutive pairs and computes, on the tensor cores (mma.sync
//     m16n8k16, float32 accumulation), the 16 x 16 products of the pairs' x rows with the tile's
//     distinct units' Wu slices (one or two 8-column halves), of which it keeps the 16 that are
//     pairs; a unit's Wu slice is thus loaded once per tile (once per block when its pairs share a
//     tile), and the next tile's slices load while this tile runs. The k order inside a 16-column
//     step is permuted the same way for x and Wu (lane q takes 8 consecutive columns), so both are
//     plain 16-byte loads.
//  4. h = g * u is written back row by row (each pair's sum found through its sorted position).
// The overflowing tiles are not touched: the fused stage computes them from the dense gate rows.
// Opt-in (FusedConfig.up_blocked): on H100 it is slower than the per-token kernel it replaces half
// of, since each pair's x slices now cross shared memory (kernels/NOTES_twell.md v7).
#include "twell_common.cuh"

#ifndef TW_DMODEL
#define TW_DMODEL 2048
#endif
#ifndef TU_TOKENS
#define TU_TOKENS 256  // tokens per block
#endif
#ifndef TU_THREADS
#define TU_THREADS 384
#endif

namespace twu {
constexpr int DM = TW_DMODEL;
constexpr int COLS = (DM % 128 == 0) ? 128 : 64;  // d_model columns per slice
constexpr int DKS = COLS / 32;                    // 32-column steps (two mma k-steps) per slice
constexpr int VROW = COLS / 8;                    // 16-byte vectors in a staged x row
constexpr int NSLICE = DM / COLS;
constexpr int B = TU_TOKENS;
constexpr int NT = TU_THREADS;
constexpr int WARPS = NT / 32;
constexpr int S = TW_SLOTS;
constexpr int T = TW_TILE;
static_assert(DM % 64 == 0, "d_model must be a multiple of 64");
static_assert(B >= 1 && B <= 256, "a token's index in its block travels in 8 bits");
static_assert(S % 4 == 0 && S <= 256, "slots are read 4 at a time and travel in 8 bits");
static_assert(NT % 32 == 0 && NT >= 64 && NT <= 1024, "TU_THREADS must be whole warps");
}  // namespace twu

// d += A B for one m16n8k16 step (A 16 x 16 row-major, B 16 x 8 "col": the units' rows), fp32.
__device__ __forceinline__ void tu_mma(float (&d)[4], tw_u32 a0, tw_u32 a1, tw_u32 a2, tw_u32 a3, tw_u32 b0,
                                       tw_u32 b1) {
#if TW_DTYPE == 0
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
#endif
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A tile: 16 consecutive sorted pairs (its rows) and their distinct units (its columns, at most 16).
// Built once per sub-round into shared memory (TuRecord), read by every slice's pass.
struct TuRecord {
  unsigned char row[16];   // the pair's x row (token in the sub-round)
  unsigned char col[16];   // the pair's column; 0xFF past the pairs
  unsigned short unit[16]; // the column's unit (ncols of them)
  int ncols;
  int pad[3];
};
static_assert(sizeof(TuRecord) == 80, "twell.py's up_shared_bytes counts 80 bytes a tile");

__device__ __forceinline__ void tu_build_record(TuRecord* rec, const tw_u32* keys, int npairs, int tile, int lane) {
  const int l16 = lane & 15;
  const int p = 16 * tile + l16;
  const tw_u32 key = keys[min(p, npairs - 1)];  // past the pairs: the last pair again (not a new column)
  const int unit = (int)(key >> 16);
  const int prev = __shfl_up_sync(TW_FULL_MASK, unit, 1, 16);
  const unsigned starts = __ballot_sync(TW_FULL_MASK, l16 == 0 || unit != prev) & 0xFFFFu;
  const int col = __popc(starts & ((2u << l16) - 1u)) - 1;
  const int ncols = __popc(starts);
  if (lane < 16) {
    rec->row[l16] = (unsigned char)((key >> 8) & 0xFFu);
    rec->col[l16] = p < npairs ? (unsigned char)col : (unsigned char)0xFFu;
    if ((starts >> l16) & 1u) rec->unit[col] = (unsigned short)unit;
    if (l16 == 15) rec->ncols = ncols;
  }
}

// What lane (g = lane / 4, q = lane % 4) needs of a tile: tile rows g and g + 8, columns g and g + 8.
struct TuLane {
  int row[2], col[2], unit[2];
  bool two_halves;  // more than 8 columns
};

__device__ __forceinline__ TuLane tu_lane(const TuRecord* rec, int g) {
  TuLane t;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    t.row[r] = rec->row[g + 8 * r];
    const int c = rec->col[g + 8 * r];
    t.col[r] = c == 0xFF ? -1 : c;
    t.unit[r] = g + 8 * r < rec->ncols ? (int)rec->unit[g + 8 * r] : -1;
  }
  t.two_halves = rec->ncols > 8;
  return t;
}

// Lane (g, q)'s 16-byte pieces of the Wu slices of columns g and g + 8: columns sl * COLS + 32 s + 8 q.
// Columns past the tile's are not loaded (their products are never read).
__device__ __forceinline__ void tu_load_b(uint4 (&b)[2][twu::DKS], const TuLane& t, const tw_u16* __restrict__ w_up,
                                          int sl, int q, tw_u64 pol) {
  using namespace twu;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (h == 1 && !t.two_halves) break;  // uniform over the warp
    if (t.unit[h] < 0) continue;
    const tw_u16* src = w_up + (size_t)t.unit[h] * DM + sl * COLS + 8 * q;
#pragma unroll
    for (int s = 0; s < DKS; ++s) b[h][s] = tw_ld16(src + 32 * s, pol);
  }
}

// f(row, position, slot, word, address) for every stored pair of rows [r_lo, r_hi) of the block
// (position: its index in the sub-round's row order; address: its index in `slots`). A thread takes
// 4 rows at a time and loads their first 4 slots together (most rows hold 1 or 2 pairs).
template <typename F>
__device__ __forceinline__ void tu_for_each_stored_pair(const int* rows, int r_lo, int r_hi, int npairs,
                                                        const tw_u32* slots, long long t0, int nt, tw_u64 pol,
                                                        F&& f) {
  using namespace twu;
  for (int r0 = r_lo + (int)threadIdx.x; r0 < r_hi; r0 += 4 * NT) {
    int start[4], count[4];
    uint4 first[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = r0 + i * NT;
      start[i] = r < r_hi ? rows[r] : 0;
      count[i] = r < r_hi ? (r + 1 < r_hi ? rows[r + 1] : npairs) - start[i] : 0;
      first[i] = count[i] > 0 ? tw_ld16(slots + ((unsigned long long)t0 * nt + r) * S, pol) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (count[i] == 0) continue;
      const int r = r0 + i * NT;
      const unsigned long long base = ((unsigned long long)t0 * nt + r) * S;
      for (int v = 0; v * 4 < count[i]; ++v) {
        const uint4 w = v == 0 ? first[i] : tw_ld16(slots + base + 4 * v, pol);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int slot = 4 * v + e;
          if (slot < count[i]) f(r, start[i] + slot, slot, tw_word(w, e), base + slot);
        }
      }
    }
  }
}

// x chunk v of sub-round row r sits at chunk v ^ tu_swz(r) of its shared-memory row: two random rows
// read by one 8-lane phase then fall in different bank halves whenever their parities differ.
__device__ __forceinline__ int tu_swz(int row) { return (row & 1) << 2; }

// The tile's products for one slice, the pairs' entries added to their float32 sums.
__device__ __forceinline__ void tu_tile_products(const TuLane& t, const uint4 (&b)[2][twu::DKS], const uint4* xs,
                                                 float* sums, int tile, int g, int q) {
  using namespace twu;
  float d[2][2][4] = {};  // [half][k-step of the 32-column step][fragment]: two independent chains a half
  const uint4* xa = xs + t.row[0] * VROW;
  const uint4* xb = xs + t.row[1] * VROW;
  const int sa = tu_swz(t.row[0]), sb = tu_swz(t.row[1]);
#pragma unroll
  for (int s = 0; s < DKS; ++s) {
    const uint4 a = xa[(4 * s + q) ^ sa], c = xb[(4 * s + q) ^ sb];
    tu_mma(d[0][0], a.x, c.x, a.y, c.y, b[0][s].x, b[0][s].y);
    tu_mma(d[0][1], a.z, c.z, a.w, c.w, b[0][s].z, b[0][s].w);
    if (t.two_halves) {
      tu_mma(d[1][0], a.x, c.x, a.y, c.y, b[1][s].x, b[1][s].y);
      tu_mma(d[1][1], a.z, c.z, a.w, c.w, b[1][s].z, b[1][s].w);
    }
  }
  // D[row][col] sits in lane (row % 8, (col % 8) / 2), element 2 (row / 8) + col % 2 of half col / 8
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int col = t.col[r];
    if (col >= 0 && ((col & 7) >> 1) == q) {
      const int e = 2 * r;
      const float lo = (col & 1) ? d[0][0][e + 1] + d[0][1][e + 1] : d[0][0][e] + d[0][1][e];
      const float hi = (col & 1) ? d[1][0][e + 1] + d[1][1][e + 1] : d[1][0][e] + d[1][1][e];
      sums[16 * tile + g + 8 * r] += (col >> 3) ? hi : lo;
    }
  }
}

// Shared memory (dynamic, 16-byte aligned pieces), sizes as twell.py's up_shared_bytes:
//   xs [B][VROW] uint4 | rows [B * nt + 1] int | tok [B + 1] int | hist [d_ff + 1] int |
//   keys [pair_cap] u32 | vals [pair_cap] (the raw list, then the float32 sums) | records [pair_cap / 16] |
//   sorted_at [pair_cap] u16
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
  TuRecord* records = reinterpret_cast<TuRecord*>(raw + pair_cap);
  unsigned short* sorted_at = reinterpret_cast<unsigned short*>(records + (pair_cap + 15) / 16);  // raw -> sorted
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
  tw_block_exclusive_scan<NT>(tok, nb + 1, s_warp);  // tok[b] = pairs before token b; tok[nb] = all of them

  for (int b_lo = 0; b_lo < nb;) {
    if (tid == 0) {  // as many tokens as the pair capacity holds (one token's nt * S always fits)
      int lo = b_lo + 1, hi = nb;  // the last b_hi with tok[b_hi] - tok[b_lo] <= pair_cap (tok ascends)
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tok[mid] - tok[b_lo] <= pair_cap) lo = mid; else hi = mid - 1;
      }
      s_round[0] = lo;
      s_round[1] = tok[lo] - tok[b_lo];
    }
    for (int u = tid; u <= d_ff; u += NT) hist[u] = 0;
    __syncthreads();
    const int b_hi = s_round[0], npairs = s_round[1];
    const int r_lo = b_lo * nt, r_hi = b_hi * nt;

    // 1. raw list in row order, histogram over the units. rows[] of this sub-round become starts.
    tw_block_exclusive_scan<NT>(rows + r_lo, r_hi - r_lo, s_warp);  // rows past r_hi keep their counts
    tu_for_each_stored_pair(rows, r_lo, r_hi, npairs, slots, t0, nt, pol_stream,
                            [&](int r, int position, int slot, tw_u32 word, unsigned long long) {
      const int b = r / nt, k = r - b * nt;
      const int unit = k * T + (int)(word & 0xFFFFu);
      raw[position] = ((tw_u32)unit << 16) | ((tw_u32)(b - b_lo) << 8) | (tw_u32)slot;
      atomicAdd(hist + unit, 1);
    });
    // 2. unit order
    tw_block_exclusive_scan<NT>(hist, d_ff + 1, s_warp);
    for (int p = tid; p < npairs; p += NT) {
      const tw_u32 key = raw[p];
      const int pos = atomicAdd(hist + (key >> 16), 1);
      keys[pos] = key;
      sorted_at[p] = (unsigned short)pos;
    }
    __syncthreads();
    for (int p = tid; p < npairs; p += NT) sums[p] = 0.f;

    // 3. partial dot products on the tensor cores, one d_model slice at a time
    const int warp = tid >> 5, g = lane >> 2, q = lane & 3;
    const int ntiles = (npairs + 15) >> 4;
    const int nbr = b_hi - b_lo;
    for (int tile = warp; tile < ntiles; tile += WARPS) tu_build_record(records + tile, keys, npairs, tile, lane);
#pragma unroll 1
    for (int sl = 0; sl < NSLICE; ++sl) {
      __syncthreads();  // the previous slice's x rows are consumed (and the sums and records written)
      for (int i = tid; i < nbr * VROW; i += NT) {
        const int b = i / VROW, v = i - b * VROW;
        xs[b * VROW + (v ^ tu_swz(b))] = tw_ld16(x + (t0 + b_lo + b) * DM + sl * COLS + v * 8, pol_stream);
      }
      __syncthreads();
      if (sl + 1 < NSLICE) {  // the next slice's rows on their way to L2 while this one is used
        constexpr int LINES = COLS * 2 / 128;
        for (int i = tid; i < nbr * LINES; i += NT) {
          const tw_u16* line = x + (t0 + b_lo + i / LINES) * DM + (sl + 1) * COLS + (i % LINES) * 64;
          asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
        }
      }
      // two tiles in flight a warp: one tile's Wu slices load while the other's products run
      uint4 b0[2][DKS], b1[2][DKS];
      TuLane m0, m1;
      int tile = warp;
      if (tile < ntiles) {
        m0 = tu_lane(records + tile, g);
        tu_load_b(b0, m0, w_up, sl, q, pol_keep);
      }
#pragma unroll 1
      while (tile < ntiles) {
        const int t1 = tile + WARPS;
        if (t1 < ntiles) {
          m1 = tu_lane(records + t1, g);
          tu_load_b(b1, m1, w_up, sl, q, pol_keep);
        }
        tu_tile_products(m0, b0, xs, sums, tile, g, q);
        if (t1 >= ntiles) break;
        const int t2 = t1 + WARPS;
        if (t2 < ntiles) {
          m0 = tu_lane(records + t2, g);
          tu_load_b(b0, m0, w_up, sl, q, pol_keep);
        }
        tu_tile_products(m1, b1, xs, sums, t1, g, q);
        tile = t2;
      }
    }
    __syncthreads();

    // 4. h = g * u into the slots, row by row as step 1 read them (rows are contiguous in memory)
    tu_for_each_stored_pair(rows, r_lo, r_hi, npairs, slots, t0, nt, pol_stream,
                            [&](int, int position, int, tw_u32 word, unsigned long long address) {
      const float h = tw_to_float(word >> 16) * sums[sorted_at[position]];
      out[address] = (tw_pack2(h, 0.f) << 16) | (word & 0xFFFFu);
    });
    __syncthreads();  // keys, sums and hist are rebuilt by the next sub-round
    b_lo = b_hi;
  }
}
