// Hybrid-format training kernels for the ReLU-gated (or plain ReLU) sparse FFN: exact forward and
// backward over the active (token, unit) pairs only. See kernels/README_hybrid.md for the format.
//
//   g = X Wg^T (outside: cuBLAS, or on Hopper twell_gate.cu with the TwELL pack), a = ReLU(g), u = x.Wu_j at active pairs, h = a*u, y = H Wd^T
//   dh = dy.Wd_j + dl1*sign(h), du = dh*a, dg = dh*u (ReLU's derivative: the gate GEMM's sign, i.e.
//   the bitmask, for every active pair), dX = dg Wg + du Wu,
//   dWg = dg^T X, dWu = du^T X, dWd = dy^T H.
// Non-gated (HY_GATED 0): h = ReLU(x Wu^T); the "gate-role" weight WG is then Wu.
//
// Kernels (one module per (HY_D, HY_GATED, HY_DTYPE)):
//   hy_pack       G [N, FF] -> row bitmask mrow [N, FF/32] + per-256-tile exclusive rank prefix
//   hy_from_twell the same from the TwELL form of the fused gate kernel (twell_gate.cu, Hopper)
//   hy_forward    warp per token (long rows split over ROW_PARTS warps): u, h, y, ELL (a, u)
//                 for ranks < W, l1 per token, stats
//   hy_rows_finish  adds the float32 parts of the long rows (y and stats, or dX)
//   hy_transpose  mrow -> column bitmask mcol [FF, ceil(N/32)] (the neuron-major index)
//   hy_dw_plan    work items per unit from the forward's neuron counts (one CTA, a scan), and the
//                 order the dW passes take them in
//   hy_fill_au    (a, u) of the pairs of ranks in [W, WD) (rows past the saved ELL), for the backward
//   hy_dwy        dW's dy pass, warp per (item, column slice): dWd^T_j and the slices' parts of
//                 dy_t.Wd_j (PD, N x WD slots: it lives only through the backward)
//   hy_dwx        dW's x pass: dh from PD, dg, du, and dWg_j, dWu_j (fp32 accumulation in registers;
//                 the items of a split unit add fp32 rows)
//   hy_dw_zero, hy_dw_finish  zero / write out the fp32 rows of the split units
//   hy_dx         warp per token (long rows split): dX = sum_j dg Wg_j + du Wu_j
// A pair whose rank in its row is >= W (a row past the saved ELL's width) has no saved values: the
// backward's hy_fill_au recomputes its (a, u) into AU for ranks < WD, and every kernel recomputes a
// pair past WD from x, dy and the weight rows (the dense backup row is the row's bitmask, which
// always exists), so nothing is ever dropped and all sizes are static.
//
// No CUDA headers: compiles with NVRTC (CuPy) and nvcc alike. HY_DTYPE 0 = bf16, 1 = fp16.

#ifndef HY_D
#define HY_D 2048
#endif
#ifndef HY_GATED
#define HY_GATED 1
#endif
#ifndef HY_DTYPE
#define HY_DTYPE 0
#endif
#ifndef HY_FWD_MINB
#define HY_FWD_MINB 1  // hy_forward: resident CTAs per SM asked of ptxas (caps its registers)
#endif

#define TW_DTYPE HY_DTYPE
#include "twell_common.cuh"  // 16-bit conversions, L2 policies, 16-byte loads / stores, warp scan

constexpr int D = HY_D;             // d_model
constexpr int NC = D / 256;         // 16-byte chunks per lane when a warp covers a row of D
constexpr int FWD_WARPS = 4;        // tokens per CTA in hy_forward / hy_dx
constexpr int DW_THR = D / 8;       // hy_dw_zero / hy_dw_finish: threads per CTA, 8 columns each

static_assert(D % 256 == 0 && D >= 256 && D <= 8192, "HY_D must be a multiple of 256 in [256, 8192]");

// ---------------------------------------------------------------------------------------------
// element conversions (16-bit patterns)

__device__ __forceinline__ tw_u32 hy_f2e(float f) {
#if HY_DTYPE == 0
  tw_u32 u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u >> 16) | 0x40u;  // NaN stays NaN
  u += 0x7FFFu + ((u >> 16) & 1u);                                 // round to nearest even
  return u >> 16;
#else
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return (tw_u32)h;
#endif
}

__device__ __forceinline__ void hy_unpack8(const uint4 q, float f[8]) {
  f[0] = tw_lo(q.x); f[1] = tw_hi(q.x); f[2] = tw_lo(q.y); f[3] = tw_hi(q.y);
  f[4] = tw_lo(q.z); f[5] = tw_hi(q.z); f[6] = tw_lo(q.w); f[7] = tw_hi(q.w);
}

__device__ __forceinline__ uint4 hy_pack8(const float f[8]) {
  uint4 q;
  q.x = hy_f2e(f[0]) | (hy_f2e(f[1]) << 16);
  q.y = hy_f2e(f[2]) | (hy_f2e(f[3]) << 16);
  q.z = hy_f2e(f[4]) | (hy_f2e(f[5]) << 16);
  q.w = hy_f2e(f[6]) | (hy_f2e(f[7]) << 16);
  return q;
}

// sum_k a_k * b_k over the 8 elements of two packed vectors
__device__ __forceinline__ float hy_dot8(const uint4 a, const uint4 b) {
  float fa[8], fb[8];
  hy_unpack8(a, fa);
  hy_unpack8(b, fb);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) s = fmaf(fa[k], fb[k], s);
  return s;
}

// acc += s * v (8 elements)
__device__ __forceinline__ void hy_axpy8(float acc[8], const float s, const uint4 v) {
  float fv[8];
  hy_unpack8(v, fv);
#pragma unroll
  for (int k = 0; k < 8; ++k) acc[k] = fmaf(s, fv[k], acc[k]);
}

__device__ __forceinline__ float hy_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TW_FULL_MASK, v, o);
  return v;
}

// Warp totals of V <= 8 values at once: returns, in lanes 4k .. 4k + 3, the sum over the warp of
// v[k] (k < V). Each butterfly level keeps half of the values and sends the other half: 9 shuffles in
// all, where hy_warp_sum takes 5 a value; every total is the same tree of additions as hy_warp_sum's.
template <int V>
__device__ __forceinline__ float hy_warp_sum_by_lane(const float v[V], int lane) {
  static_assert(V >= 1 && V <= 8, "hy_warp_sum_by_lane: 1 to 8 values");
  float a[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) a[i] = i < V ? v[i] : 0.f;
#pragma unroll
  for (int half = 4, o = 16; half >= 1; half >>= 1, o >>= 1) {  // o: 16, 8, 4 keeps 4, 2, 1 values
    const bool upper = (lane & o) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float keep = upper ? a[i + half] : a[i];
      const float send = upper ? a[i] : a[i + half];
      a[i] = keep + __shfl_xor_sync(TW_FULL_MASK, send, o);
    }
  }
  a[0] += __shfl_xor_sync(TW_FULL_MASK, a[0], 2);
  a[0] += __shfl_xor_sync(TW_FULL_MASK, a[0], 1);
  return a[0];
}

__device__ __forceinline__ float2 hy_f2(float a, float b) {
  float2 r;
  r.x = a;
  r.y = b;
  return r;
}
__device__ __forceinline__ uint4 hy_zero4() {
  uint4 r;
  r.x = r.y = r.z = r.w = 0u;
  return r;
}
__device__ __forceinline__ int hy_min(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ float hy_sign(float v) { return (float)(v > 0.f) - (float)(v < 0.f); }

// Rank of column j among the active columns of row t (number of active columns before j).
__device__ __forceinline__ int hy_rank(const tw_u32* __restrict__ mrow, const int* __restrict__ tprefix,
                                       int t, int j, int nw, int nt) {
  const tw_u32* r = mrow + (size_t)t * nw;
  int rank = __ldg(tprefix + (size_t)t * nt + (j >> 8));
  const int w = j >> 5;
  const int q0 = (j >> 8) << 3;
  if ((nw & 7) == 0) {  // the tile's 8 words in two 16-byte loads
    const uint4 lo = __ldg(reinterpret_cast<const uint4*>(r + q0));
    const uint4 hi = __ldg(reinterpret_cast<const uint4*>(r + q0) + 1);
    const tw_u32 v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    const int wi = w - q0;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const tw_u32 m = (q < wi) ? 0xFFFFFFFFu : (q == wi ? ((1u << (j & 31)) - 1u) : 0u);
      rank += __popc(v[q] & m);
    }
    return rank;
  }
  for (int q = q0; q < w; ++q) rank += __popc(__ldg(r + q));
  return rank + __popc(__ldg(r + w) & ((1u << (j & 31)) - 1u));
}

// ---------------------------------------------------------------------------------------------
// hy_pack: warp per row of G. 256 columns (one stats tile) per step, 8 per lane.

// Tile T (256 columns) of a row of G through the whole warp, 8 columns a lane: its words of the row
// bitmask mr and the ELL's a of its active columns, ranked from `first`; returns its active count.
__device__ __forceinline__ int hy_pack_tile(const tw_u16* __restrict__ grow, int T, int first, tw_u32* __restrict__ mr,
                                             float2* __restrict__ ell_row, int FF, int W, tw_u64 policy) {
  const int lane = threadIdx.x & 31;
  const int c0 = T * 256 + lane * 8;
  tw_u32 m8 = 0;
  float f[8];
  if (c0 < FF) {
    hy_unpack8(tw_ld16(reinterpret_cast<const uint4*>(grow + c0), policy), f);
#pragma unroll
    for (int e = 0; e < 8; ++e) m8 |= (tw_u32)(f[e] > 0.f) << e;
  }
  const int cnt8 = __popc(m8);
  const int incl = tw_warp_scan(cnt8, lane);
  int r = first + incl - cnt8;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    if ((m8 >> e) & 1u) {
      if (r < W) ell_row[r] = hy_f2(f[e], 0.f);
      ++r;
    }
  }
  tw_u32 w = m8 << (8 * (lane & 3));
  w |= __shfl_xor_sync(TW_FULL_MASK, w, 1);
  w |= __shfl_xor_sync(TW_FULL_MASK, w, 2);
  if ((lane & 3) == 0 && c0 < FF) mr[T * 8 + (lane >> 2)] = w;
  return __shfl_sync(TW_FULL_MASK, incl, 31);
}

extern "C" __global__ void __launch_bounds__(256)
hy_pack(const tw_u16* __restrict__ G, tw_u32* __restrict__ mrow, int* __restrict__ tprefix,
        float2* __restrict__ ell, int N, int FF, int W) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= N) return;
  const int nw = FF >> 5, nt = (FF + 255) >> 8;
  const tw_u64 pol_first = tw_policy_stream();
  int base = 0;
  for (int T = 0; T < nt; ++T) {
    if (lane == 0) tprefix[(size_t)t * nt + T] = base;
    base += hy_pack_tile(G + (size_t)t * FF, T, base, mrow + (size_t)t * nw, ell + (size_t)t * W, FF, W, pol_first);
  }
}

// ---------------------------------------------------------------------------------------------
// hy_from_twell: the same format from the TwELL form that the fused gate kernel (twell_gate.cu,
// Hopper) writes in its epilogue, so that G never makes a round trip through device memory. Warp per
// row, lane per tile of 256 units: a tile's slots hold (bits << 16) | column of its first
// min(count, S) active columns in ascending order, and a tile with count > S has its dense segment
// in G instead, which the whole warp then reads as hy_pack does. Writes mrow, tprefix and the ELL's
// a exactly as hy_pack would from the same G, and copies the a of each pair past the ELL
// (rank >= W) of a tile that did not overflow into G, where hy_forward reads it. (A warp walking
// the tiles one after another waited on one slot load per tile: 0.066 ms at 16384 x 5632.)

extern "C" __global__ void __launch_bounds__(256)
hy_from_twell(tw_u16* __restrict__ G, const int* __restrict__ counts, const tw_u32* __restrict__ slots,
              tw_u32* __restrict__ mrow, int* __restrict__ tprefix, float2* __restrict__ ell, int N, int FF,
              int W, int S) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= N) return;
  const int nw = FF >> 5, nt = (FF + 255) >> 8;
  tw_u16* grow = G + (size_t)t * FF;
  tw_u32* mr = mrow + (size_t)t * nw;
  float2* ell_row = ell + (size_t)t * W;
  int base = 0;  // active columns of the row before this round of 32 tiles
  for (int T0 = 0; T0 < nt; T0 += 32) {
    const int T = T0 + lane;
    const int count = T < nt ? __ldg(counts + (size_t)t * nt + T) : 0;
    const int incl = tw_warp_scan(count, lane);
    const int first = base + incl - count;  // rank of the tile's first pair
    if (T < nt) tprefix[(size_t)t * nt + T] = first;
    if (T < nt && count <= S) {
      const tw_u32* sl = slots + ((size_t)t * nt + T) * S;
      tw_u32 word[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
#pragma unroll 4
      for (int s = 0; s < count; ++s) {
        const tw_u32 v = __ldg(sl + s);
        const int col = (int)(v & 0xFFFFu), rank = first + s;
        if (rank < W) ell_row[rank] = hy_f2(tw_hi(v), 0.f);
        else grow[T * 256 + col] = (tw_u16)(v >> 16);
#pragma unroll
        for (int w = 0; w < 8; ++w) word[w] |= (col >> 5) == w ? 1u << (col & 31) : 0u;
      }
#pragma unroll
      for (int w = 0; w < 8; ++w)
        if (T * 8 + w < nw) mr[T * 8 + w] = word[w];
    }
    // overflowing tiles, one at a time through the whole warp
    for (tw_u32 dense = __ballot_sync(TW_FULL_MASK, T < nt && count > S); dense != 0u; dense &= dense - 1u) {
      const int k = __ffs(dense) - 1;
      hy_pack_tile(grow, T0 + k, __shfl_sync(TW_FULL_MASK, first, k), mr, ell_row, FF, W, tw_policy_stream());
    }
    base += __shfl_sync(TW_FULL_MASK, incl, 31);
  }
}

// ---------------------------------------------------------------------------------------------
// hy_transpose16: out [C, R] = in [R, C]^T for 16-bit elements (R, C even). 64x64 tiles through
// shared memory, 32-bit accesses; block (32, 8).

extern "C" __global__ void __launch_bounds__(256)
hy_transpose16(const tw_u16* __restrict__ in, tw_u16* __restrict__ out, int R, int C) {
  __shared__ tw_u16 tile[64][66];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int r0 = blockIdx.y * 64, c0 = blockIdx.x * 64;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = r0 + ty + 8 * i, c = c0 + 2 * tx;
    if (r < R && c < C) {
      const tw_u32 v = __ldg(reinterpret_cast<const tw_u32*>(in + (size_t)r * C + c));
      tile[ty + 8 * i][2 * tx] = (tw_u16)(v & 0xFFFFu);
      tile[ty + 8 * i][2 * tx + 1] = (tw_u16)(v >> 16);
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int c = c0 + ty + 8 * i, r = r0 + 2 * tx;
    if (c < C && r < R) {
      const tw_u32 v = (tw_u32)tile[2 * tx][ty + 8 * i] | ((tw_u32)tile[2 * tx + 1][ty + 8 * i] << 16);
      *reinterpret_cast<tw_u32*>(out + (size_t)c * R + r) = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// hy_transpose: mrow [N, nw] -> mcol [FF, WC], WC = ceil(N/32). Warp per (4 blocks of 32 tokens, word).

// 32 x 32 bit matrix transpose across a warp: lane i holds row i (bit c = column c); returns column
// `lane` (bit i = row i's bit `lane`). Five rounds swap the off-diagonal blocks of 16, 8, 4, 2, 1
// bits: a shuffle and a select each, where 32 ballots took ~6x the instructions.
__device__ __forceinline__ tw_u32 hy_transpose32(tw_u32 v, int lane) {
  const tw_u32 low[5] = {0x0000FFFFu, 0x00FF00FFu, 0x0F0F0F0Fu, 0x33333333u, 0x55555555u};
#pragma unroll
  for (int k = 0; k < 5; ++k) {
    const int j = 16 >> k;
    const tw_u32 m = low[k];
    const tw_u32 p = __shfl_xor_sync(TW_FULL_MASK, v, j);
    v = (lane & j) ? ((v & ~m) | ((p >> j) & m)) : ((v & m) | ((p << j) & ~m));
  }
  return v;
}

// A warp takes 4 blocks of 32 tokens, so that each lane writes its unit's 4 consecutive words with one
// 16-byte store where the rows allow it (WC % 4 == 0): a 4-byte store a lane made 2.9M partial-sector
// L2 writes at 16384 x 5632, which held the kernel at 85% of the L2's throughput (Nsight Compute, v19).
constexpr int TR_BLOCKS = 4;

extern "C" __global__ void __launch_bounds__(256)
hy_transpose(const tw_u32* __restrict__ mrow, tw_u32* __restrict__ mcol, int N, int FF) {
  const int lane = threadIdx.x & 31;
  const int nw = FF >> 5, WC = (N + 31) >> 5;
  const int b0 = blockIdx.x * TR_BLOCKS;
  const int w = blockIdx.y * 8 + (threadIdx.x >> 5);
  if (w >= nw) return;
  tw_u32 column[TR_BLOCKS];
#pragma unroll
  for (int k = 0; k < TR_BLOCKS; ++k) {
    const int t = (b0 + k) * 32 + lane;
    column[k] = hy_transpose32(t < N ? __ldg(mrow + (size_t)t * nw + w) : 0u, lane);
  }
  tw_u32* out = mcol + (size_t)(w * 32 + lane) * WC + b0;
  if ((WC & (TR_BLOCKS - 1)) == 0) {
    *reinterpret_cast<uint4*>(out) = make_uint4(column[0], column[1], column[2], column[3]);
  } else {
#pragma unroll
    for (int k = 0; k < TR_BLOCKS; ++k)
      if (b0 + k < WC) out[k] = column[k];
  }
}

// ---------------------------------------------------------------------------------------------
// Long rows. The warp-per-token kernels (hy_forward, hy_dx) take tokens in `order`, most active
// first. In whole models a few tokens (the first positions of each sequence) activate hundreds to
// thousands of units where the mean is ~30, and one warp alone would make such a row the kernel's
// tail. So the first `split` tokens of the order (at most R, those with at least the host's
// threshold of units) are split: ROW_PARTS warps each take the row's pairs of rank = part (mod
// ROW_PARTS) and write float32 partial sums to PART [R][ROW_PARTS][D] (and the forward's statistics
// to their own slots), which hy_rows_finish adds in a fixed order: results stay deterministic.
// Grid: R * ROW_PARTS / FWD_WARPS CTAs of parts, then ceil(N / FWD_WARPS) CTAs of a token per warp.

constexpr int ROW_PARTS = 16;
static_assert(ROW_PARTS % FWD_WARPS == 0 && (ROW_PARTS & (ROW_PARTS - 1)) == 0, "ROW_PARTS: power of two");

struct hy_work {
  int t;       // token
  int part;    // part of a split row, or -1: the whole row
  int index;   // position in the order (split rows: < split)
};

// This warp's work, or t < 0 for none. Uniform across a CTA's warps for split rows.
__device__ __forceinline__ hy_work hy_row_work(const int* __restrict__ order, const int* __restrict__ split_count,
                                               int R, int N) {
  const int warp = threadIdx.x >> 5;
  const int split = hy_min(hy_min(split_count ? __ldg(split_count) : 0, R), N);
  const int part_ctas = R * (ROW_PARTS / FWD_WARPS);
  hy_work w;
  if ((int)blockIdx.x < part_ctas) {
    w.index = blockIdx.x / (ROW_PARTS / FWD_WARPS);
    w.part = (blockIdx.x % (ROW_PARTS / FWD_WARPS)) * FWD_WARPS + warp;
  } else {
    w.index = split + ((int)blockIdx.x - part_ctas) * FWD_WARPS + warp;
    w.part = -1;
  }
  const bool valid = w.part >= 0 ? w.index < split : w.index < N;
  w.t = valid ? __ldg(order + w.index) : -1;
  return w;
}

// float32 row (lane's columns (c*32 + lane)*8 .. +7) to dst[0 .. D)
__device__ __forceinline__ void hy_store_part(float* __restrict__ dst, const float acc[NC][8]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    float4* q = reinterpret_cast<float4*>(dst + (c * 32 + lane) * 8);
    q[0] = make_float4(acc[c][0], acc[c][1], acc[c][2], acc[c][3]);
    q[1] = make_float4(acc[c][4], acc[c][5], acc[c][6], acc[c][7]);
  }
}

__device__ __forceinline__ void hy_zero_acc(float acc[NC][8]) {
#pragma unroll
  for (int c = 0; c < NC; ++c)
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[c][k] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// hy_forward: warp per token (or per part of a long row). Lane l holds columns (c*32 + l)*8 .. +7
// of x and of y, c < NC. G (the gate GEMM output, [N, FF]) gives a for pairs past the ELL.

// Calls visit(j, rank) for the pairs of a row (bitmask words mr[0 .. nw)) that lie in its words w
// with w % step == sel (step a power of two: 1 for a whole row, ROW_PARTS for a part of a long one),
// in ascending unit order; rank counts all of the row's earlier pairs. A part only walks its own
// words: splitting by rank instead made every part step through every pair of the row.
template <class Visit>
__device__ __forceinline__ void hy_row_pairs(const tw_u32* __restrict__ mr, int nw, int sel, int step, Visit&& visit) {
  const int lane = threadIdx.x & 31;
  int base = 0;  // pairs in earlier chunks of 32 words
  for (int wb = 0; wb < nw; wb += 32) {
    const tw_u32 full = (wb + lane < nw) ? __ldg(mr + wb + lane) : 0u;
    const int incl = tw_warp_scan(__popc(full), lane);  // pairs in this chunk's words up to lane's
    tw_u32 word = (((wb + lane) & (step - 1)) == sel) ? full : 0u;
    for (;;) {
      const tw_u32 bal = __ballot_sync(TW_FULL_MASK, word != 0u);
      if (bal == 0u) break;
      const int src = __ffs(bal) - 1;
      const tw_u32 ws = __shfl_sync(TW_FULL_MASK, word, src);  // src's pairs not visited yet
      const int j = ((wb + src) << 5) + (__ffs(ws) - 1);
      const int rank = base + __shfl_sync(TW_FULL_MASK, incl, src) - __popc(ws);
      if (lane == src) word &= word - 1u;
      visit(j, rank);
    }
    base += __shfl_sync(TW_FULL_MASK, incl, 31);
  }
}

// Past d_model 2560 (gated) the row of x, the accumulators and both weight rows of a pair do not fit
// 255 registers together (64 bytes of spills at 3072, 388 at 4096): the row of x then lives in
// shared memory and is read back per pair (4 bytes of spills left at 4096). Against the spilling
// kernel: hy_forward -2% at 2816 and 3072, -36% at 3328, -22% at 4096; loading Wd's row after the
// dot product instead cost +11% at 3072 (NOTES_hybrid.md v18).
constexpr bool FWD_X_IN_SHARED = HY_GATED && NC > 10;

extern "C" __global__ void __launch_bounds__(FWD_WARPS * 32, HY_FWD_MINB)
hy_forward(const tw_u16* __restrict__ X, const tw_u16* __restrict__ G, const tw_u16* __restrict__ WU,
           const tw_u16* __restrict__ WDT, const tw_u32* __restrict__ mrow, tw_u16* __restrict__ Y,
           float2* ell, float* __restrict__ l1_tok, int* __restrict__ tile_counts,
           int* __restrict__ neuron_counts, const int* __restrict__ order, const int* __restrict__ split_count,
           float* __restrict__ part_y, float* __restrict__ part_l1, int* __restrict__ part_tc, int R, int N,
           int FF, int W) {
  extern __shared__ int s_tc[];  // [FWD_WARPS][nt]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nw = FF >> 5, nt = (FF + 255) >> 8;
  int* tc = s_tc + warp * nt;
  for (int i = lane; i < nt; i += 32) tc[i] = 0;
  __syncwarp();
  const hy_work work = hy_row_work(order, split_count, R, N);
  if (work.t < 0) return;
  const int t = work.t;
  const int sel = work.part < 0 ? 0 : work.part, step = work.part < 0 ? 1 : ROW_PARTS;
  const tw_u64 pol_w = tw_policy_keep(), pol_s = tw_policy_stream();

#if HY_GATED
  __shared__ uint4 s_x[FWD_X_IN_SHARED ? FWD_WARPS * D / 8 : 1];
  uint4* xs = s_x + (FWD_X_IN_SHARED ? warp * D / 8 : 0);  // each lane reads back only its own chunks
  uint4 xr[FWD_X_IN_SHARED ? 1 : NC];
  {
    const uint4* xrow = reinterpret_cast<const uint4*>(X + (size_t)t * D);
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const uint4 v = tw_ld16(xrow + c * 32 + lane, pol_s);
      if constexpr (FWD_X_IN_SHARED) xs[c * 32 + lane] = v;
      else xr[c] = v;
    }
  }
#endif
  float acc[NC][8];
  hy_zero_acc(acc);

  float l1 = 0.f;
  float a_pref = 0.f;  // whole rows: lane l holds a of the pair of rank 32*(rank/32) + l, from the ELL
  const tw_u16* grow = G + (size_t)t * FF;
  hy_row_pairs(mrow + (size_t)t * nw, nw, sel, step, [&](const int j, const int rank) {
    float a;
    if (step == 1) {  // every rank in turn: the ELL's a values a warp's load at a time
      if ((rank & 31) == 0 && rank < W) {
        const int r = rank + lane;
        a_pref = (r < W) ? __ldg(&ell[(size_t)t * W + r].x) : 0.f;
      }
      const float a_ell = __shfl_sync(TW_FULL_MASK, a_pref, rank & 31);
      a = (rank < W) ? a_ell : tw_to_float(grow[j]);
    } else {
      a = (rank < W) ? __ldg(&ell[(size_t)t * W + rank].x) : tw_to_float(grow[j]);
    }
    const uint4* wdr = reinterpret_cast<const uint4*>(WDT + (size_t)j * D);
    uint4 wd[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) wd[c] = tw_ld16(wdr + c * 32 + lane, pol_w);
#if HY_GATED
    const uint4* wur = reinterpret_cast<const uint4*>(WU + (size_t)j * D);
    uint4 wu[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) wu[c] = tw_ld16(wur + c * 32 + lane, pol_w);
    float p = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      if constexpr (FWD_X_IN_SHARED) p += hy_dot8(xs[c * 32 + lane], wu[c]);
      else p += hy_dot8(xr[c], wu[c]);
    }
    const float u = hy_warp_sum(p);
    const float h = a * u;
#else
    const float u = 0.f;
    const float h = a;
#endif
#pragma unroll
    for (int c = 0; c < NC; ++c) hy_axpy8(acc[c], h, wd[c]);
    if (lane == 0) {
      if (rank < W) ell[(size_t)t * W + rank] = hy_f2(a, u);
      if (h != 0.f) {
        tc[j >> 8] += 1;
        atomicAdd(neuron_counts + j, 1);
        l1 += fabsf(h);
      }
    }
  });
  __syncwarp();
  if (work.part >= 0) {  // a part of a long row: partial sums for hy_rows_finish
    const size_t slot = (size_t)work.index * ROW_PARTS + work.part;
    hy_store_part(part_y + slot * D, acc);
    if (lane == 0) part_l1[slot] = l1;
    for (int i = lane; i < nt; i += 32) part_tc[slot * nt + i] = tc[i];
    return;
  }
  uint4* yrow = reinterpret_cast<uint4*>(Y + (size_t)t * D);
#pragma unroll
  for (int c = 0; c < NC; ++c) tw_st16(yrow + c * 32 + lane, hy_pack8(acc[c]), pol_s);
  if (lane == 0) l1_tok[t] = l1;
  for (int i = lane; i < nt; i += 32) tile_counts[(size_t)t * nt + i] = tc[i];
}

// hy_rows_finish: CTA per split row i < split (D / 8 threads): OUT[order[i]] = the sum of its
// ROW_PARTS float32 partial rows in part order; with part_l1 / part_tc (the forward), also the
// token's L1 sum and tile counts.
extern "C" __global__ void __launch_bounds__(1024)
hy_rows_finish(const float* __restrict__ part, const float* __restrict__ part_l1, const int* __restrict__ part_tc,
               const int* __restrict__ order, const int* __restrict__ split_count, tw_u16* __restrict__ OUT,
               float* __restrict__ l1_tok, int* __restrict__ tile_counts, int R, int N, int nt) {
  const int i = blockIdx.x, tid = threadIdx.x;
  if (i >= hy_min(hy_min(__ldg(split_count), R), N)) return;
  const int t = __ldg(order + i);
  const float* rows = part + (size_t)i * ROW_PARTS * D + tid * 8;
  float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int p = 0; p < ROW_PARTS; ++p) {
    const float4 lo = __ldg(reinterpret_cast<const float4*>(rows + (size_t)p * D));
    const float4 hi = __ldg(reinterpret_cast<const float4*>(rows + (size_t)p * D) + 1);
    v[0] += lo.x; v[1] += lo.y; v[2] += lo.z; v[3] += lo.w;
    v[4] += hi.x; v[5] += hi.y; v[6] += hi.z; v[7] += hi.w;
  }
  reinterpret_cast<uint4*>(OUT + (size_t)t * D)[tid] = hy_pack8(v);
  if (part_l1 == nullptr) return;
  if (tid == 0) {
    float l1 = 0.f;
    for (int p = 0; p < ROW_PARTS; ++p) l1 += __ldg(part_l1 + (size_t)i * ROW_PARTS + p);
    l1_tok[t] = l1;
  }
  for (int k = tid; k < nt; k += blockDim.x) {
    int n = 0;
    for (int p = 0; p < ROW_PARTS; ++p) n += __ldg(part_tc + ((size_t)i * ROW_PARTS + p) * nt + k);
    tile_counts[(size_t)t * nt + k] = n;
  }
}

// ---------------------------------------------------------------------------------------------
// The backward's per-pair quantities. A pair (t, j) needs pd = dy_t.Wd_j (all of it), a and u; from
// them (ReLU's derivative is the bitmask's, the bf16 gate GEMM's sign, for every active pair, also
// for a recomputed one whose float32 pre-activation rounds to <= 0: as bf16 autograd does):
struct hy_coef {
  float dg, du, h;
};
__device__ __forceinline__ hy_coef hy_pair_coef(float pd, float a, float u, float dl1) {
  hy_coef c;
#if HY_GATED
  c.h = a * u;
  const float dh = pd + dl1 * hy_sign(c.h);
  c.du = dh * a;
  c.dg = dh * u;
#else
  (void)u;
  c.h = a;
  c.dg = pd + dl1 * hy_sign(c.h);
  c.du = 0.f;
#endif
  return c;
}

// The exact path of a pair with nothing stored: x_t.WG_j, x_t.WU_j (gated) and, given dy's row,
// dy_t.WD_j, over the whole row by the whole warp (lane l: columns (c*32 + l)*8 .. +7). Rolled (Unroll
// 1) where it is a rare path beside a kernel's accumulators, whose registers it would otherwise take.
struct hy_dots {
  float g, u, d;
};
template <int Unroll = NC>
__device__ __forceinline__ hy_dots hy_pair_dots(const uint4* __restrict__ xrow, const uint4* __restrict__ dyrow,
                                                const tw_u16* __restrict__ WG, const tw_u16* __restrict__ WU,
                                                const tw_u16* __restrict__ WDT, int j) {
  const int lane = threadIdx.x & 31;
  const uint4* wgr = reinterpret_cast<const uint4*>(WG + (size_t)j * D);
  float pg = 0.f, pu = 0.f, pd = 0.f;
#pragma unroll Unroll
  for (int c = 0; c < NC; ++c) pg += hy_dot8(__ldg(xrow + c * 32 + lane), __ldg(wgr + c * 32 + lane));
#if HY_GATED
  const uint4* wur = reinterpret_cast<const uint4*>(WU + (size_t)j * D);
#pragma unroll Unroll
  for (int c = 0; c < NC; ++c) pu += hy_dot8(__ldg(xrow + c * 32 + lane), __ldg(wur + c * 32 + lane));
  pu = hy_warp_sum(pu);
#endif
  if (dyrow != nullptr) {
    const uint4* wdr = reinterpret_cast<const uint4*>(WDT + (size_t)j * D);
#pragma unroll Unroll
    for (int c = 0; c < NC; ++c) pd += hy_dot8(__ldg(dyrow + c * 32 + lane), __ldg(wdr + c * 32 + lane));
    pd = hy_warp_sum(pd);
  }
  hy_dots r;
  r.g = hy_warp_sum(pg);
  r.u = pu;
  r.d = pd;
  return r;
}

// ---------------------------------------------------------------------------------------------
// dW in two passes over column slices. hy_dwy (the dy pass) takes slices of DWY_C chunks of 256
// columns: for each pair of its unit it adds h * dy_t's slice to dWd^T_j's and writes the slice's part
// of dy_t.Wd_j into PD; hy_dwx (the x pass) sums the parts to dh, derives dg and du, and adds dg x_t,
// du x_t into dWg_j, dWu_j's slice of DWX_C chunks. A warp takes an item (a unit's tokens, or a part
// of them for a unit that fires on many) and a slice; the items run slice by slice (the item index's
// outer part), so the warps running at once read one slice of dy or x (N x 2 KB of dy, N x 1 KB of x:
// 34 and 17 MB at 16384 tokens): it stays in L2, where the one-pass kernel, a CTA per unit over whole rows, read all of x
// and dy from DRAM once per wave of running units and needed a CTA-wide reduction per token.
// The store (N x WD slots; WD >= W lives only through the backward): PD [N][WD][DWY_SLICES] and, for
// ranks in [W, WD), AU [N][WD] = (a, u) written beforehand by hy_fill_au. Past WD every pass
// recomputes a pair from x, dy and the weight rows (hy_pair_dots): exact, and rare (rows of > WD units).

#ifndef HY_DWY_C
#define HY_DWY_C 4
#endif
constexpr int DWY_C = NC % HY_DWY_C == 0 ? HY_DWY_C : (NC % 2 == 0 ? 2 : 1);
constexpr int DWY_SLICES = NC / DWY_C;
constexpr int DWX_C = NC % 2 == 0 ? 2 : 1;
constexpr int DWX_SLICES = NC / DWX_C;
#ifndef HY_DWY_DEPTH
#define HY_DWY_DEPTH 4
#endif
#ifndef HY_DWX_DEPTH
#define HY_DWX_DEPTH 8
#endif
constexpr int DWY_DEPTH = HY_DWY_DEPTH;  // tokens in a warp's cp.async ring (a power of two)
constexpr int DWX_DEPTH = HY_DWX_DEPTH;
static_assert((DWY_DEPTH & (DWY_DEPTH - 1)) == 0 && (DWX_DEPTH & (DWX_DEPTH - 1)) == 0, "ring depths: powers of two");
constexpr int DW_LIST = 64;      // a warp's token list (shared memory), handled lane-parallel 32 at a time
constexpr int DW_CTA_WARPS = 8;
// Resident CTAs per SM asked of ptxas, so 128 registers (hy_dwx spilled with 3). On sm_80 its code for
// the same source needs more and spilled (hy_dwy 144 bytes), so there it gets its own choice.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int DWY_MINB = 2, DWX_MINB = 2;
#else
constexpr int DWY_MINB = 1, DWX_MINB = 1;
#endif

// (a, u) of a pair of rank r < WD in row t: the saved ELL's (r < W), else hy_fill_au's AU.
__device__ __forceinline__ float2 hy_stored_au(const float2* __restrict__ ell, const float2* __restrict__ AU, int t,
                                               int r, int W, int WD) {
  return r < W ? __ldg(ell + (size_t)t * W + r) : __ldg(AU + (size_t)t * WD + r);
}

// (dg, du, h) of a pair of rank r < WD in row t from the backward's store: hy_dwy's parts of dy_t.Wd_j
// (summed in slice order) and (a, u).
__device__ __forceinline__ hy_coef hy_stored_coef(const float* __restrict__ PD, const float2* __restrict__ ell,
                                                  const float2* __restrict__ AU, int t, int r, int W, int WD,
                                                  float dl1) {
  const size_t slot = (size_t)t * WD + r;
  float pd = 0.f;
#pragma unroll
  for (int s = 0; s < DWY_SLICES; ++s) pd += __ldg(PD + slot * DWY_SLICES + s);
  const float2 e = hy_stored_au(ell, AU, t, r, W, WD);
  return hy_pair_coef(pd, e.x, e.y, dl1);
}

// hy_fill_au: (a, u) of every pair with rank in [W, WD), token-major as hy_dx (long rows split), two
// pairs at a time: a warp waited on one pair's weight rows at a time, and in the 2B model's layers with
// rows of 1000+ units that made the kernel 0.17 ms.
__device__ __forceinline__ void hy_fill_pairs(const uint4* __restrict__ xrow, const tw_u16* __restrict__ WG,
                                              const tw_u16* __restrict__ WU, float2* __restrict__ au_row, int j0,
                                              int rank0, int j1, int rank1, int n) {
  const int lane = threadIdx.x & 31;
  float p[4] = {0.f, 0.f, 0.f, 0.f};  // pg, pu of the first pair, then of the second
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const uint4 xv = __ldg(xrow + c * 32 + lane);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (k < n) {
        const size_t row = (size_t)(k == 0 ? j0 : j1) * D;
        p[2 * k] += hy_dot8(xv, __ldg(reinterpret_cast<const uint4*>(WG + row) + c * 32 + lane));
#if HY_GATED
        p[2 * k + 1] += hy_dot8(xv, __ldg(reinterpret_cast<const uint4*>(WU + row) + c * 32 + lane));
#endif
      }
    }
  }
  const float total = hy_warp_sum_by_lane<4>(p, lane);  // lanes 4v .. 4v + 3: the warp's sum of p[v]
  const float g0 = __shfl_sync(TW_FULL_MASK, total, 0), u0 = __shfl_sync(TW_FULL_MASK, total, 4);
  const float g1 = __shfl_sync(TW_FULL_MASK, total, 8), u1 = __shfl_sync(TW_FULL_MASK, total, 12);
  if (lane == 0) {
    au_row[rank0] = hy_f2(fmaxf(g0, 0.f), HY_GATED ? u0 : 0.f);
    if (n > 1) au_row[rank1] = hy_f2(fmaxf(g1, 0.f), HY_GATED ? u1 : 0.f);
  }
}

extern "C" __global__ void __launch_bounds__(FWD_WARPS * 32)
hy_fill_au(const tw_u16* __restrict__ X, const tw_u16* __restrict__ WG, const tw_u16* __restrict__ WU,
           const tw_u32* __restrict__ mrow, const int* __restrict__ tprefix, float2* __restrict__ AU,
           const int* __restrict__ order, const int* __restrict__ split_count, int R, int N, int FF, int W,
           int WD) {
  const int lane = threadIdx.x & 31;
  const hy_work work = hy_row_work(order, split_count, R, N);
  if (work.t < 0) return;
  const int t = work.t, nw = FF >> 5, nt = (FF + 255) >> 8;
  const tw_u32* mr = mrow + (size_t)t * nw;
  const int q = (nt - 1) * 8 + lane;  // the last tile's words, then its prefix: the row's count
  const int last = (lane < 8 && q < nw) ? __popc(__ldg(mr + q)) : 0;
  const int count = __ldg(tprefix + (size_t)t * nt + nt - 1) + __shfl_sync(TW_FULL_MASK, tw_warp_scan(last, lane), 31);
  if (count <= W) return;
  const uint4* xrow = reinterpret_cast<const uint4*>(X + (size_t)t * D);
  float2* au_row = AU + (size_t)t * WD;
  int held_j = 0, held_rank = -1;  // warp-uniform: a pair waiting for a partner (rank -1: none)
  hy_row_pairs(mr, nw, work.part < 0 ? 0 : work.part, work.part < 0 ? 1 : ROW_PARTS, [&](const int j, const int r) {
    if (r < W || r >= WD) return;
    if (held_rank < 0) {
      held_j = j;
      held_rank = r;
      return;
    }
    hy_fill_pairs(xrow, WG, WU, au_row, held_j, held_rank, j, r, 2);
    held_rank = -1;
  });
  if (held_rank >= 0) hy_fill_pairs(xrow, WG, WU, au_row, held_j, held_rank, 0, 0, 1);
}

// The tokens of list positions [lo, hi) of a unit (its column bitmask mc, WC words), ascending,
// DW_LIST at a time through the warp's shared list: batch(n) sees list[0 .. n).
template <class Batch>
__device__ __forceinline__ void hy_item_tokens(const tw_u32* __restrict__ mc, int WC, int lo, int hi,
                                               int* list, Batch&& batch) {
  const int lane = threadIdx.x & 31;
  constexpr int AHEAD = 4;  // chunks of 32 words loaded at once
  int seen = 0, len = 0;    // list positions before this chunk; tokens in the list
  for (int wb0 = 0; wb0 < WC && seen < hi; wb0 += 32 * AHEAD) {
    tw_u32 words[AHEAD];
#pragma unroll
    for (int a = 0; a < AHEAD; ++a) {
      const int w = wb0 + a * 32 + lane;
      words[a] = w < WC ? __ldg(mc + w) : 0u;
    }
#pragma unroll
    for (int a = 0; a < AHEAD; ++a) {
      const tw_u32 word = words[a];
      const int cnt = __popc(word);
      const int incl = tw_warp_scan(cnt, lane);
      const int total = __shfl_sync(TW_FULL_MASK, incl, 31);
      int p0 = max(lo - seen, 0);
      const int p1 = min(hi - seen, total);
      while (p0 < p1) {  // in-chunk positions [p0, p0 + take) go to the list
        const int take = min(p1 - p0, DW_LIST - len);
        int p = incl - cnt;
        if (p < p0 + take && p + cnt > p0) {
          const int base = (wb0 + a * 32 + lane) << 5;
          for (tw_u32 w = word; w != 0u; w &= w - 1u, ++p)
            if (p >= p0 && p < p0 + take) list[len + p - p0] = base + __ffs(w) - 1;
        }
        __syncwarp();
        len += take;
        p0 += take;
        if (len == DW_LIST) {
          batch(len);
          __syncwarp();
          len = 0;
        }
      }
      seen += total;
    }
  }
  if (len > 0) batch(len);
  __syncwarp();
}

// A warp's next (item, slice), slice-major, from the counter that hy_dw_plan zeroed.
struct hy_dw_item {
  int unit, lo, hi, slice;
  bool split;
};
__device__ __forceinline__ bool hy_next_item(int* counter, const int* __restrict__ item_start,
                                             const int* __restrict__ order, int FF, int slices, int S,
                                             hy_dw_item& it) {
  int i = 0;
  if ((threadIdx.x & 31) == 0) i = atomicAdd(counter, 1);
  i = __shfl_sync(TW_FULL_MASK, i, 0);
  const int n_items = __ldg(item_start + FF);
  if (i >= n_items * slices) return false;
  it.slice = i / n_items;
  const unsigned e = (unsigned)__ldg(order + (i - it.slice * n_items));
  it.unit = (int)(e >> 16);
  const int k = (int)(e & 0xFFFFu);
  const int parts = __ldg(item_start + it.unit + 1) - __ldg(item_start + it.unit);
  it.lo = k * S;
  it.hi = k == parts - 1 ? 0x7FFFFFFF : (k + 1) * S;
  it.split = parts > 1;
  return true;
}

// Token k's value of a per-lane pair (lanes hold tokens lane and lane + 32 of the list); k is warp-uniform.
template <class T>
__device__ __forceinline__ T hy_of_token(const T (&v)[2], int k) {
  return __shfl_sync(TW_FULL_MASK, (k >> 5) ? v[1] : v[0], k & 31);
}

__device__ __forceinline__ tw_u32 hy_smem_addr(const void* p) {
  tw_u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ void hy_cp16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(hy_smem_addr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void hy_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void hy_cp_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
}

// The slices (C 16-byte chunks a lane from chunk q0 on) of the rows of a batch's n tokens through the
// warp's cp.async ring of DEPTH tokens (DEPTH - 1 in flight): consume(k, chunks) for k = 0 .. n - 1 in
// order. Each lane copies and reads back only its own chunks, so cp.async.wait_group is all the
// synchronisation there is. (Loads into registers, a few tokens at a time, left a warp waiting on L2
// once per group: 0.41 + 0.60 ms for the two passes at 99.5%.)
template <int C, int DEPTH, class Consume>
__device__ __forceinline__ void hy_ring_tokens(const uint4* __restrict__ rows, const int (&tok)[2], int n, int q0,
                                               uint4* ring, Consume&& consume) {
  const int lane = threadIdx.x & 31;
  auto issue = [&](const int k) {
    if (k < n) {
      const uint4* src = rows + (size_t)hy_of_token(tok, k) * (D / 8) + q0 * 32 + lane;
      uint4* dst = ring + (k & (DEPTH - 1)) * C * 32 + lane;
#pragma unroll
      for (int c = 0; c < C; ++c) hy_cp16(dst + c * 32, src + c * 32);
    }
    hy_cp_commit();
  };
#pragma unroll
  for (int k = 0; k < DEPTH - 1; ++k) issue(k);
  for (int k = 0; k < n; ++k) {
    issue(k + DEPTH - 1);
    hy_cp_wait<DEPTH - 1>();
    const uint4* slot = ring + (k & (DEPTH - 1)) * C * 32 + lane;
    uint4 q[C];
#pragma unroll
    for (int c = 0; c < C; ++c) q[c] = slot[c * 32];
    consume(k, q);
  }
}

// A slice's columns of a unit's fp32 row: written out (one-item units) or added into ACC (split units,
// hy_dw_finish writes those).
template <int C>
__device__ __forceinline__ void hy_dw_out(const float (&acc)[C][8], int q0, bool split, tw_u16* __restrict__ out,
                                          float* __restrict__ acc_row) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int col = ((q0 + c) * 32 + lane) * 8;
    if (split) {
#pragma unroll
      for (int e = 0; e < 8; ++e) atomicAdd(acc_row + col + e, acc[c][e]);
    } else {
      tw_st16(out + col, hy_pack8(acc[c]), tw_policy_stream());
    }
  }
}

// hy_dwy: dWd^T_j's slice and the slice's parts of dy_t.Wd_j.
extern "C" __global__ void __launch_bounds__(DW_CTA_WARPS * 32, DWY_MINB)
hy_dwy(const tw_u16* __restrict__ X, const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
       const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT, const tw_u32* __restrict__ mrow,
       const tw_u32* __restrict__ mcol, const int* __restrict__ tprefix, const float2* __restrict__ ell,
       const float2* __restrict__ AU, float* __restrict__ PD, tw_u16* __restrict__ DWDT,
       const int* __restrict__ item_start, const int* __restrict__ order, int* counter, float* __restrict__ ACC,
       int S, int N, int FF, int W, int WD) {
  __shared__ int s_list[DW_CTA_WARPS][DW_LIST];
  extern __shared__ uint4 s_ring[];  // [DW_CTA_WARPS][DWY_DEPTH][DWY_C][32]
  const int lane = threadIdx.x & 31;
  int* list = s_list[threadIdx.x >> 5];
  uint4* ring = s_ring + (threadIdx.x >> 5) * DWY_DEPTH * DWY_C * 32;
  const int nw = FF >> 5, nt = (FF + 255) >> 8, WC = (N + 31) >> 5;
  const uint4* dy4 = reinterpret_cast<const uint4*>(DY);
  hy_dw_item it;
  while (hy_next_item(counter, item_start, order, FF, DWY_SLICES, S, it)) {
    const int j = it.unit, q0 = it.slice * DWY_C;
    float wd[DWY_C][8], acc[DWY_C][8];
#pragma unroll
    for (int c = 0; c < DWY_C; ++c) {
      hy_unpack8(tw_ld16(reinterpret_cast<const uint4*>(WDT + (size_t)j * D) + (q0 + c) * 32 + lane,
                         tw_policy_stream()), wd[c]);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[c][e] = 0.f;
    }
    hy_item_tokens(mcol + (size_t)j * WC, WC, it.lo, it.hi, list, [&](const int n) {
      int tok[2], rank[2];  // rank >= WD: nothing stored, recomputed
      float h[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int k = lane + 32 * i;
        tok[i] = 0;
        rank[i] = 0;
        h[i] = 0.f;
        if (k < n) {
          const int t = list[k];
          const int r = hy_rank(mrow, tprefix, t, j, nw, nt);
          tok[i] = t;
          rank[i] = r;
          if (r < WD) {
            const float2 e = hy_stored_au(ell, AU, t, r, W, WD);
            h[i] = hy_pair_coef(0.f, e.x, e.y, 0.f).h;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {  // pairs past WD: (a, u) from the whole rows
        for (tw_u32 redo = __ballot_sync(TW_FULL_MASK, lane + 32 * i < n && rank[i] >= WD); redo; redo &= redo - 1u) {
          const int src = __ffs(redo) - 1;
          const int ts = __shfl_sync(TW_FULL_MASK, tok[i], src);
          const hy_dots p = hy_pair_dots<1>(reinterpret_cast<const uint4*>(X + (size_t)ts * D), nullptr, WG, WU,
                                            nullptr, j);
          const hy_coef c = hy_pair_coef(0.f, fmaxf(p.g, 0.f), p.u, 0.f);
          if (lane == src) h[i] = c.h;
        }
      }
      hy_ring_tokens<DWY_C, DWY_DEPTH>(dy4, tok, n, q0, ring, [&](const int k, const uint4 (&q)[DWY_C]) {
        const float hk = hy_of_token(h, k);
        float p = 0.f;
#pragma unroll
        for (int c = 0; c < DWY_C; ++c) {
          float f[8];
          hy_unpack8(q[c], f);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            p = fmaf(f[e], wd[c][e], p);
            acc[c][e] = fmaf(hk, f[e], acc[c][e]);
          }
        }
        p = hy_warp_sum(p);
        if (lane == (k & 31)) {
          const int t = (k >> 5) ? tok[1] : tok[0], r = (k >> 5) ? rank[1] : rank[0];
          if (r < WD) PD[((size_t)t * WD + r) * DWY_SLICES + it.slice] = p;
        }
      });
    });
    hy_dw_out<DWY_C>(acc, q0, it.split, DWDT + (size_t)j * D, ACC + ((size_t)j * 3 + 2) * D);
  }
}

// hy_dwx: dWg_j's and dWu_j's slices from dh = the sum of PD's parts + dl1 sign(h).
extern "C" __global__ void __launch_bounds__(DW_CTA_WARPS * 32, DWX_MINB)
hy_dwx(const tw_u16* __restrict__ X, const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
       const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT, const tw_u32* __restrict__ mrow,
       const tw_u32* __restrict__ mcol, const int* __restrict__ tprefix, const float2* __restrict__ ell,
       const float2* __restrict__ AU, const float* __restrict__ PD, const float* __restrict__ dl1p,
       tw_u16* __restrict__ DWG, tw_u16* __restrict__ DWU, const int* __restrict__ item_start,
       const int* __restrict__ order, int* counter, float* __restrict__ ACC, int S, int N, int FF, int W, int WD) {
  __shared__ int s_list[DW_CTA_WARPS][DW_LIST];
  extern __shared__ uint4 s_ring[];  // [DW_CTA_WARPS][DWX_DEPTH][DWX_C][32]
  const int lane = threadIdx.x & 31;
  int* list = s_list[threadIdx.x >> 5];
  uint4* ring = s_ring + (threadIdx.x >> 5) * DWX_DEPTH * DWX_C * 32;
  const int nw = FF >> 5, nt = (FF + 255) >> 8, WC = (N + 31) >> 5;
  const float dl1 = __ldg(dl1p);
  const uint4* x4 = reinterpret_cast<const uint4*>(X);
  hy_dw_item it;
  while (hy_next_item(counter, item_start, order, FF, DWX_SLICES, S, it)) {
    const int j = it.unit, q0 = it.slice * DWX_C;
    float ag[DWX_C][8];
#if HY_GATED
    float au[DWX_C][8];
#endif
#pragma unroll
    for (int c = 0; c < DWX_C; ++c)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        ag[c][e] = 0.f;
#if HY_GATED
        au[c][e] = 0.f;
#endif
      }
    hy_item_tokens(mcol + (size_t)j * WC, WC, it.lo, it.hi, list, [&](const int n) {
      int tok[2];
      float dg[2], du[2];
      bool redo[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int k = lane + 32 * i;
        tok[i] = 0;
        dg[i] = du[i] = 0.f;
        redo[i] = false;
        if (k < n) {
          const int t = list[k];
          const int r = hy_rank(mrow, tprefix, t, j, nw, nt);
          tok[i] = t;
          if (r < WD) {
            const hy_coef c = hy_stored_coef(PD, ell, AU, t, r, W, WD, dl1);
            dg[i] = c.dg;
            du[i] = c.du;
          } else {
            redo[i] = true;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {  // pairs past WD: everything from the whole rows
        for (tw_u32 m = __ballot_sync(TW_FULL_MASK, redo[i]); m; m &= m - 1u) {
          const int src = __ffs(m) - 1;
          const size_t rs = (size_t)__shfl_sync(TW_FULL_MASK, tok[i], src) * (D / 8);
          const hy_dots p = hy_pair_dots<1>(x4 + rs, reinterpret_cast<const uint4*>(DY) + rs, WG, WU, WDT, j);
          const hy_coef c = hy_pair_coef(p.d, fmaxf(p.g, 0.f), p.u, dl1);
          if (lane == src) {
            dg[i] = c.dg;
            du[i] = c.du;
          }
        }
      }
      hy_ring_tokens<DWX_C, DWX_DEPTH>(x4, tok, n, q0, ring, [&](const int k, const uint4 (&q)[DWX_C]) {
        const float gk = hy_of_token(dg, k);
#if HY_GATED
        const float uk = hy_of_token(du, k);
#endif
#pragma unroll
        for (int c = 0; c < DWX_C; ++c) {
          float f[8];
          hy_unpack8(q[c], f);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            ag[c][e] = fmaf(gk, f[e], ag[c][e]);
#if HY_GATED
            au[c][e] = fmaf(uk, f[e], au[c][e]);
#endif
          }
        }
      });
    });
    hy_dw_out<DWX_C>(ag, q0, it.split, DWG + (size_t)j * D, ACC + (size_t)j * 3 * D);
#if HY_GATED
    hy_dw_out<DWX_C>(au, q0, it.split, DWU + (size_t)j * D, ACC + ((size_t)j * 3 + 1) * D);
#endif
  }
}

// ---------------------------------------------------------------------------------------------
// hy_dx: dX_t = sum over active j of dg_tj * WG_j + du_tj * WU_j; warp per token, long rows split
// as hy_forward's. (dg, du) of ranks < WD come from PD's parts and (a, u) (the ELL or AU), past WD
// from the whole rows (hy_pair_dots).

// acc += the pairs of row t in the words w with w % step == sel (hy_row_pairs)
__device__ __forceinline__ void hy_dx_row(float acc[NC][8], int t, int sel, int step, const tw_u16* __restrict__ X,
                                          const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
                                          const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT,
                                          const tw_u32* __restrict__ mrow, const float2* __restrict__ ell,
                                          const float2* __restrict__ AU, const float* __restrict__ PD, float dl1,
                                          int nw, int W, int WD, float2* pref) {
  // pref (the warp's shared slots): whole rows keep there the (dg, du) of ranks 32 * (rank / 32) + lane
  // (in shared memory rather than registers: at d_model 2048 two more registers made ptxas spill)
  const int lane = threadIdx.x & 31;
  const tw_u64 pol_w = tw_policy_keep();
  const uint4* xrow = reinterpret_cast<const uint4*>(X + (size_t)t * D);
  const uint4* dyrow = reinterpret_cast<const uint4*>(DY + (size_t)t * D);
  hy_row_pairs(mrow + (size_t)t * nw, nw, sel, step, [&](const int j, const int rank) {
    hy_coef c;
    if (rank < WD && step == 1) {  // every rank in turn: 32 pairs' coefficients a warp's loads at a time
      if ((rank & 31) == 0) {
        const int r = rank + lane;  // ranks past the row's count read unused slots: never selected
        __syncwarp();               // the last block's slots are read
        if (r < WD) {
          const hy_coef cr = hy_stored_coef(PD, ell, AU, t, r, W, WD, dl1);
          pref[lane] = hy_f2(cr.dg, cr.du);
        }
        __syncwarp();
      }
      const float2 p = pref[rank & 31];
      c.dg = p.x;
      c.du = p.y;
    } else if (rank < WD) {
      c = hy_stored_coef(PD, ell, AU, t, rank, W, WD, dl1);
    } else {
      const hy_dots p = hy_pair_dots(xrow, dyrow, WG, WU, WDT, j);
      c = hy_pair_coef(p.d, fmaxf(p.g, 0.f), p.u, dl1);
    }
    const uint4* wgr = reinterpret_cast<const uint4*>(WG + (size_t)j * D);
#if HY_GATED
    const uint4* wur = reinterpret_cast<const uint4*>(WU + (size_t)j * D);
    uint4 wg[NC], wu[NC];
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      wg[k] = tw_ld16(wgr + k * 32 + lane, pol_w);
      wu[k] = tw_ld16(wur + k * 32 + lane, pol_w);
    }
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      hy_axpy8(acc[k], c.dg, wg[k]);
      hy_axpy8(acc[k], c.du, wu[k]);
    }
#else
    uint4 wg[NC];
#pragma unroll
    for (int k = 0; k < NC; ++k) wg[k] = tw_ld16(wgr + k * 32 + lane, pol_w);
#pragma unroll
    for (int k = 0; k < NC; ++k) hy_axpy8(acc[k], c.dg, wg[k]);
#endif
  });
}

// d_model <= 512: ask ptxas for 4 resident CTAs (left alone it settles on 40 registers and a small
// spill at 256); up to 2048 on Hopper: 3 (~168 registers at 2048, where left alone it took 128 and
// spilled 80 bytes); else its own choice (a cap of 3 CTAs spilled 20-100 bytes from 2304 up, and 16
// bytes at 2048 on sm_80).
#if HY_D <= 512
#define HY_DX_BOUNDS __launch_bounds__(FWD_WARPS * 32, 4)
#elif HY_D <= 2048 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define HY_DX_BOUNDS __launch_bounds__(FWD_WARPS * 32, 3)
#else
#define HY_DX_BOUNDS __launch_bounds__(FWD_WARPS * 32)
#endif
extern "C" __global__ void HY_DX_BOUNDS
hy_dx(const tw_u16* __restrict__ X, const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
      const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT, const tw_u32* __restrict__ mrow,
      const float2* __restrict__ ell, const float2* __restrict__ AU, const float* __restrict__ PD,
      const float* __restrict__ dl1p, tw_u16* __restrict__ DX, const int* __restrict__ order,
      const int* __restrict__ split_count, float* __restrict__ part_dx, int R, int N, int FF, int W, int WD) {
  const int lane = threadIdx.x & 31;
  __shared__ float2 s_pref[FWD_WARPS][32];
  const hy_work work = hy_row_work(order, split_count, R, N);
  if (work.t < 0) return;
  float acc[NC][8];
  hy_zero_acc(acc);
  hy_dx_row(acc, work.t, work.part < 0 ? 0 : work.part, work.part < 0 ? 1 : ROW_PARTS, X, DY, WG, WU, WDT, mrow,
            ell, AU, PD, __ldg(dl1p), FF >> 5, W, WD, s_pref[threadIdx.x >> 5]);
  if (work.part >= 0) {
    hy_store_part(part_dx + ((size_t)work.index * ROW_PARTS + work.part) * D, acc);
    return;
  }
  const tw_u64 pol_s = tw_policy_stream();
  uint4* dxrow = reinterpret_cast<uint4*>(DX + (size_t)work.t * D);
#pragma unroll
  for (int c = 0; c < NC; ++c) tw_st16(dxrow + c * 32 + lane, hy_pack8(acc[c]), pol_s);
}

// ---------------------------------------------------------------------------------------------
// hy_dw_plan: one CTA of 1024 threads. item_start[j] = the work items of the units before j (FF + 1
// entries), where unit j has max(1, ceil(neuron_counts[j] / part)) items (its token list positions
// [k*part, (k+1)*part), the last one taking the rest); item_start[FF + 1] and [FF + 2] are hy_dwy's
// and hy_dwx's item counters, zeroed. order[i] = unit << 16 | part (as unsigned bits) of the i-th
// item: the split units' parts first (the longest items start first), then the one-item units.
// `rank` (FF entries) is scratch.
__device__ __forceinline__ int hy_unit_items(int count, int part) { return max(1, (count + part - 1) / part); }

extern "C" __global__ void __launch_bounds__(1024)
hy_dw_plan(const int* __restrict__ neuron_counts, int* item_start, int* rank, int* order, int FF, int part) {
  __shared__ int warp_sums[32];
  for (int j = threadIdx.x; j <= FF; j += 1024) {
    const int items = j < FF ? hy_unit_items(__ldg(neuron_counts + j), part) : 0;
    item_start[j] = items;
    if (j < FF) rank[j] = items == 1;
  }
  const int items = tw_block_exclusive_scan<1024>(item_start, FF + 1, warp_sums);
  const int singles = tw_block_exclusive_scan<1024>(rank, FF, warp_sums);  // one-item units before j
  for (int j = threadIdx.x; j < FF; j += 1024) {
    const int n_items = item_start[j + 1] - item_start[j];
    if (n_items == 1) {
      order[items - singles + rank[j]] = (int)((unsigned)j << 16);
    } else {
      for (int k = 0; k < n_items; ++k) order[item_start[j] - rank[j] + k] = (int)(((unsigned)j << 16) | k);
    }
  }
  if (threadIdx.x == 0) {
    item_start[FF + 1] = 0;
    item_start[FF + 2] = 0;
  }
}

// hy_dw_zero / hy_dw_finish: CTA per unit, DW_THR threads; only the units split over several items.
extern "C" __global__ void __launch_bounds__(DW_THR)
hy_dw_zero(const int* __restrict__ item_start, float* __restrict__ ACC, int FF) {
  const int j = blockIdx.x;
  if (__ldg(item_start + j + 1) - __ldg(item_start + j) <= 1) return;
  float* acc = ACC + (size_t)j * 3 * D;
  for (int i = threadIdx.x; i < 3 * D; i += DW_THR) acc[i] = 0.f;
}

extern "C" __global__ void __launch_bounds__(DW_THR)
hy_dw_finish(const int* __restrict__ item_start, const float* __restrict__ ACC, tw_u16* __restrict__ DWG,
             tw_u16* __restrict__ DWU, tw_u16* __restrict__ DWDT, int FF) {
  const int j = blockIdx.x, tid = threadIdx.x;
  if (__ldg(item_start + j + 1) - __ldg(item_start + j) <= 1) return;
  const float* acc = ACC + (size_t)j * 3 * D + tid * 8;
  float v[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = acc[k];
  reinterpret_cast<uint4*>(DWG + (size_t)j * D)[tid] = hy_pack8(v);
#if HY_GATED
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = acc[D + k];
  reinterpret_cast<uint4*>(DWU + (size_t)j * D)[tid] = hy_pack8(v);
#endif
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = acc[2 * D + k];
  reinterpret_cast<uint4*>(DWDT + (size_t)j * D)[tid] = hy_pack8(v);
}
