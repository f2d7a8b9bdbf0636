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
//   hy_dw         CTA per work item (a unit's tokens, split into parts where it fires on many):
//                 dh, dg, du for its tokens, dWg_j, dWu_j, dWd^T_j (fp32 accumulation in
//                 registers; the parts of a split unit add fp32 rows), and the ELL of (dg, du), WD wide
//                 (WD >= W: it lives only through the backward)
//   hy_dw_plan    work items per unit from the forward's neuron counts (one CTA, a scan), and the
//                 order hy_dw takes them in
//   hy_dw_zero, hy_dw_finish  zero / write out the fp32 rows of the split units
//   hy_dx         warp per token (long rows split): dX = sum_j dg Wg_j + du Wu_j
// A pair whose rank in its row is >= W (a row past the ELL width) has no stored values: every
// kernel recomputes them from x and the weight rows it streams anyway (the dense backup row is
// the row's bitmask, which always exists), so nothing is ever dropped and all sizes are static.
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
constexpr int DW_THR = D / 8;       // hy_dw: threads per CTA, 8 columns each
constexpr int DW_WARPS = DW_THR / 32;
#ifndef HY_DW_BT
#define HY_DW_BT 6  // 2 x 6 beat 3 x 4 by 12-22% (NOTES_hybrid.md v13); 2 CTAs an SM fit up to 12 slices
#endif
#ifndef HY_DW_NS
#define HY_DW_NS 2
#endif
constexpr int DW_BT = HY_DW_BT;     // hy_dw: tokens per batch (two barriers a batch)
constexpr int DW_NS = HY_DW_NS;     // hy_dw: cp.async stages
constexpr int DW_WPT = 4;           // hy_dw: column-bitmask words per thread per scan round
constexpr int DW_CAP = 512;         // hy_dw: tokens listed in shared memory at a time

static_assert(D % 256 == 0 && D >= 256 && D <= 8192, "HY_D must be a multiple of 256 in [256, 8192]");

// hy_dw: resident CTAs per SM asked of ptxas. Two where two CTAs' shared memory fits the SM (d_model
// 2048 on Hopper), else one: asking for two where shared memory holds one only capped the registers
// (spills from d_model 2304 up) and bought no occupancy.
// (An underestimate only costs occupancy where registers would have allowed two CTAs.)
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900 || __CUDA_ARCH__ == 1000 || __CUDA_ARCH__ == 1030)
constexpr int SM_SHARED_BYTES = 228 * 1024;
#elif defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870)
constexpr int SM_SHARED_BYTES = 164 * 1024;
#else
constexpr int SM_SHARED_BYTES = 100 * 1024;  // sm_86, sm_89, sm_120 and others
#endif
constexpr int DW_CTA_SHARED = DW_NS * DW_BT * 2 * DW_THR * 16  // the cp.async stages (dynamic)
                              + DW_CAP * 20 + DW_WARPS * (3 * DW_BT + 1) * 4 + DW_BT * 12 + 20  // hy_dw's static arrays
                              + 1024;  // reserved by the system per CTA
constexpr int DW_MINB = 2 * DW_CTA_SHARED <= SM_SHARED_BYTES ? 2 : 1;

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
// hy_dx: dX_t = sum over active j of dg_tj * WG_j + du_tj * WU_j; warp per token, long rows split
// as hy_forward's. (dg, du) come from ell_d for ranks < W (here: hy_dw's WD), else they are
// recomputed exactly as hy_dw does.

// acc += the pairs of row t in the words w with w % step == sel (hy_row_pairs)
__device__ __forceinline__ void hy_dx_row(float acc[NC][8], int t, int sel, int step, const tw_u16* __restrict__ X,
                                          const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
                                          const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT,
                                          const tw_u32* __restrict__ mrow, const float2* __restrict__ ell_d,
                                          float dl1, int nw, int W) {
  const int lane = threadIdx.x & 31;
  const tw_u64 pol_w = tw_policy_keep();
  const uint4* xrow = reinterpret_cast<const uint4*>(X + (size_t)t * D);
  const uint4* dyrow = reinterpret_cast<const uint4*>(DY + (size_t)t * D);
  hy_row_pairs(mrow + (size_t)t * nw, nw, sel, step, [&](const int j, const int rank) {
    float dg, du;
    if (rank < W) {
      const float2 e = __ldg(ell_d + (size_t)t * W + rank);
      dg = e.x;
      du = e.y;
    } else {
      // overflow pair: recompute g, u, dh from x, dy and the unit's weight rows
      const uint4* wdr = reinterpret_cast<const uint4*>(WDT + (size_t)j * D);
      const uint4* wgr = reinterpret_cast<const uint4*>(WG + (size_t)j * D);
      float pd = 0.f, pg = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        pd += hy_dot8(__ldg(dyrow + c * 32 + lane), __ldg(wdr + c * 32 + lane));
        pg += hy_dot8(__ldg(xrow + c * 32 + lane), __ldg(wgr + c * 32 + lane));
      }
#if HY_GATED
      const uint4* wur = reinterpret_cast<const uint4*>(WU + (size_t)j * D);
      float pu = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) pu += hy_dot8(__ldg(xrow + c * 32 + lane), __ldg(wur + c * 32 + lane));
      pu = hy_warp_sum(pu);
#endif
      pd = hy_warp_sum(pd);
      pg = hy_warp_sum(pg);
      const float a = fmaxf(pg, 0.f);
#if HY_GATED
      const float h = a * pu;
      const float dh = pd + dl1 * hy_sign(h);
      du = dh * a;
      dg = dh * pu;  // the pair is active by the gate GEMM's sign (the bitmask), whatever pg's
#else
      const float dh = pd + dl1 * hy_sign(a);
      dg = dh;
      du = 0.f;
      (void)du;
#endif
    }
    const uint4* wgr = reinterpret_cast<const uint4*>(WG + (size_t)j * D);
#if HY_GATED
    const uint4* wur = reinterpret_cast<const uint4*>(WU + (size_t)j * D);
    uint4 wg[NC], wu[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      wg[c] = tw_ld16(wgr + c * 32 + lane, pol_w);
      wu[c] = tw_ld16(wur + c * 32 + lane, pol_w);
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      hy_axpy8(acc[c], dg, wg[c]);
      hy_axpy8(acc[c], du, wu[c]);
    }
#else
    uint4 wg[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) wg[c] = tw_ld16(wgr + c * 32 + lane, pol_w);
#pragma unroll
    for (int c = 0; c < NC; ++c) hy_axpy8(acc[c], dg, wg[c]);
#endif
  });
}

// d_model <= 512: ask ptxas for 4 resident CTAs (left alone it settles on 40 registers and a small
// spill at 256); larger: its own choice (about 150 registers at 2048, 3 CTAs an SM) beats any cap.
#if HY_D <= 512
#define HY_DX_BOUNDS __launch_bounds__(FWD_WARPS * 32, 4)
#else
#define HY_DX_BOUNDS __launch_bounds__(FWD_WARPS * 32)
#endif
extern "C" __global__ void HY_DX_BOUNDS
hy_dx(const tw_u16* __restrict__ X, const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
      const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT, const tw_u32* __restrict__ mrow,
      const float2* __restrict__ ell_d, const float* __restrict__ dl1p, tw_u16* __restrict__ DX,
      const int* __restrict__ order, const int* __restrict__ split_count, float* __restrict__ part_dx, int R,
      int N, int FF, int W) {
  const int lane = threadIdx.x & 31;
  const hy_work work = hy_row_work(order, split_count, R, N);
  if (work.t < 0) return;
  float acc[NC][8];
  hy_zero_acc(acc);
  hy_dx_row(acc, work.t, work.part < 0 ? 0 : work.part, work.part < 0 ? 1 : ROW_PARTS, X, DY, WG, WU, WDT, mrow,
            ell_d, __ldg(dl1p), FF >> 5, W);
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
// hy_dw: CTA per work item, DW_THR threads, thread i owns columns 8i .. 8i+7. An item is unit j's
// tokens with list positions [k*S, (k+1)*S) (the last item of a unit takes all the rest): a unit
// firing on many tokens is split over several CTAs instead of making one CTA the whole kernel's
// tail. The unit's tokens come from its column bitmask, DW_CAP at a time; x_t and dy_t slices
// stream through a DW_NS-stage cp.async pipeline into thread-private shared memory, DW_BT tokens
// a batch. A unit of one item writes its dW rows; the items of a split unit add float32 partial
// rows into ACC (zeroed by hy_dw_zero) and hy_dw_finish writes those units' rows.
// Token sweep (`sweep` > 0, the number of CTAs running at once): x and dy (N x 4 KB each at d 2048)
// do not fit L2, and every unit's tokens are spread over all N. Walked from token 0, the running
// items drift apart and read all of x and dy at once. So a one-item unit starts its walk at the
// token where the running items are now: the position a walk would have reached if every item had
// started at the kernel's start, i.e. the pairs the one-item walks have done (`progress`) over the
// pairs all CTAs do in the time of one walk (sweep x the mean pairs of a one-item unit), modulo 1,
// times N; it then wraps around. The running items so walk through the same tokens together. Only the order
// changes: every token of the unit is still visited once. Split units cannot sweep (a part is a fixed
// range of its unit's token list); hy_dw_plan puts their parts first, ordered by where each lies in
// its unit's list, so that the parts running together read rows of nearby tokens: in the 2B model's
// layers (a hundred units on 512 to all 16384 tokens) hy_dw went from 1.09-1.32 ms to 0.90-0.98 ms.

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

// Bitmask word at position `wr` of a walk that starts at word `first` and wraps around at WC.
__device__ __forceinline__ int hy_walk_word(int wr, int first, int WC) {
  return wr + first < WC ? wr + first : wr + first - WC;
}

extern "C" __global__ void __launch_bounds__(DW_THR, DW_MINB)
hy_dw(const tw_u16* __restrict__ X, const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
      const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT, const tw_u32* __restrict__ mrow,
      const tw_u32* __restrict__ mcol, const int* __restrict__ tprefix, const float2* __restrict__ ell,
      const float* __restrict__ dl1p, float2* __restrict__ ell_d, tw_u16* __restrict__ DWG,
      tw_u16* __restrict__ DWU, tw_u16* __restrict__ DWDT, const int* __restrict__ item_start,
      const int* __restrict__ order, float* __restrict__ ACC, int* __restrict__ progress, int sweep, int S, int N,
      int FF, int W, int WD) {
  extern __shared__ uint4 s_buf[];  // [DW_NS][DW_BT][2][DW_THR]: x then dy slices
  __shared__ int s_tok[DW_CAP];
  __shared__ unsigned s_row[DW_CAP];  // t * D / 8: the token's row in 16-byte units (N * D < 2^31)
  __shared__ int s_rank[DW_CAP];
  __shared__ float2 s_au[DW_CAP];
  __shared__ float s_part[DW_WARPS][3 * DW_BT];
  __shared__ float s_coef[DW_BT][3];
  __shared__ int s_wsum[DW_WARPS];
  volatile __shared__ int s_range[5];  // lo, hi, items of the unit, unit, first word of the walk

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nw = FF >> 5, nt = (FF + 255) >> 8, WC = (N + 31) >> 5;
  // dl1, the L2 policy and the item count are re-read where used: hy_dw is at its register limit

#pragma unroll 1
  for (int item = blockIdx.x; item < __ldg(item_start + FF); item += gridDim.x) {
  if (tid == 0) {  // unit and list positions [lo, hi) of this item, in shared memory (registers are short)
    const unsigned e = (unsigned)__ldg(order + item);
    const int unit = (int)(e >> 16), k_item = (int)(e & 0xFFFFu);
    const int n_items = __ldg(item_start + unit + 1) - __ldg(item_start + unit);
    s_range[0] = k_item * S;
    s_range[1] = (k_item == n_items - 1) ? 0x7FFFFFFF : (k_item + 1) * S;
    s_range[2] = n_items;
    s_range[3] = unit;
    int first_word = 0;
    if (sweep > 0 && n_items == 1) {  // split units keep token order: their items share one list
      // a one-item walk covers all N tokens in the time its CTA does its unit's pairs: the mean over
      // the one-item units (split units' longer items would make the phase lag the walks)
      const float per_item = (float)__ldg(item_start + FF + 1) / (float)max(__ldg(item_start + FF + 3), 1);
      float phase = (float)*(volatile int*)progress / fmaxf((float)sweep * per_item, 1.f);
      phase -= floorf(phase);
      first_word = min((int)(phase * (float)WC), WC - 1);
    }
    s_range[4] = first_word;
  }
  __syncthreads();
  const int j = s_range[3];

  // wd is used for every token; wg and wu only to recompute pairs past the ELL width: kept packed
  float wd[8];
  hy_unpack8(tw_ld16(reinterpret_cast<const uint4*>(WDT + (size_t)j * D) + tid, tw_policy_stream()), wd);
  const uint4 wgq = tw_ld16(reinterpret_cast<const uint4*>(WG + (size_t)j * D) + tid, tw_policy_stream());
#if HY_GATED
  const uint4 wuq = tw_ld16(reinterpret_cast<const uint4*>(WU + (size_t)j * D) + tid, tw_policy_stream());
  float au[8];
#endif
  float ag[8], ad[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    ag[k] = 0.f;
    ad[k] = 0.f;
#if HY_GATED
    au[k] = 0.f;
#endif
  }

  const tw_u32* mc = mcol + (size_t)j * WC;
  int seen = 0;  // tokens of unit j in earlier rounds
#pragma unroll 1
  for (int cw = 0; cw < WC && seen < s_range[1]; cw += DW_THR * DW_WPT) {
    // ---- this round's words: thread i holds words cw + i*DW_WPT .. +DW_WPT-1 (ascending tokens)
    tw_u32 words[DW_WPT];
    int cnt = 0;
#pragma unroll
    for (int q = 0; q < DW_WPT; ++q) {
      const int wr = cw + tid * DW_WPT + q;  // position in the walk
      words[q] = (wr < WC) ? __ldg(mc + hy_walk_word(wr, s_range[4], WC)) : 0u;
      cnt += __popc(words[q]);
    }
    int incl = tw_warp_scan(cnt, lane);
    __syncthreads();  // previous round's s_wsum reads are done
    if (lane == 31) s_wsum[warp] = incl;
    __syncthreads();
    int off = incl - cnt, total = 0;
#pragma unroll
    for (int w = 0; w < DW_WARPS; ++w) {
      const int s = s_wsum[w];
      if (w < warp) off += s;
      total += s;
    }
    // this item's part of the round: round positions [first, last)
    const int first = s_range[0] - seen > 0 ? s_range[0] - seen : 0;
    const int last = hy_min(total, s_range[1] - seen);
    seen += total;
    // ---- the item's tokens of the round, DW_CAP at a time, into s_tok with their ranks in s_rank
    for (int base = first; base < last; base += DW_CAP) {
      const int m = hy_min(DW_CAP, last - base);
      __syncthreads();  // previous list fully consumed
      if (off < base + m && off + cnt > base) {
        int p = off;
#pragma unroll
        for (int q = 0; q < DW_WPT; ++q) {
          tw_u32 wq = words[q];
          const int wi = hy_walk_word(cw + tid * DW_WPT + q, s_range[4], WC);
          while (wq) {
            const int bit = __ffs(wq) - 1;
            wq &= wq - 1u;
            if (p >= base && p < base + m) s_tok[p - base] = (wi << 5) + bit;
            ++p;
          }
        }
      }
      __syncthreads();
      for (int k = tid; k < m; k += DW_THR) {
        const int t = s_tok[k];
        const int r = hy_rank(mrow, tprefix, t, j, nw, nt);
        s_row[k] = (unsigned)t * (unsigned)(D / 8);
        s_rank[k] = r;
        s_au[k] = (r < W) ? __ldg(ell + (size_t)t * W + r) : hy_f2(0.f, 0.f);
      }
      __syncthreads();
    // ---- batches of DW_BT tokens through the cp.async pipeline
    const int nb = (m + DW_BT - 1) / DW_BT;
    // the address arithmetic of these copies was a fifth of the kernel's instructions: row offsets
    // come precomputed from s_row, and this thread's slice of row 0 is the base
    const uint4* x_slice = reinterpret_cast<const uint4*>(X) + tid;
    const uint4* dy_slice = reinterpret_cast<const uint4*>(DY) + tid;
    auto issue = [&](int bb) {
      uint4* dst = s_buf + (bb % DW_NS) * DW_BT * 2 * DW_THR + tid;
#pragma unroll
      for (int k = 0; k < DW_BT; ++k) {
        const int idx = bb * DW_BT + k;
        if (idx < m) {
          const unsigned row = s_row[idx];
          hy_cp16(dst + (2 * k + 0) * DW_THR, x_slice + row);
          hy_cp16(dst + (2 * k + 1) * DW_THR, dy_slice + row);
        }
      }
    };
#pragma unroll
    for (int s = 0; s < DW_NS - 1; ++s) {
      if (s < nb) issue(s);
      hy_cp_commit();
    }
    for (int b = 0; b < nb; ++b) {
      if (b + DW_NS - 1 < nb) issue(b + DW_NS - 1);
      hy_cp_commit();
      hy_cp_wait<DW_NS - 1>();
      const int stage = b % DW_NS;
      const int k0 = b * DW_BT;
      const int kn = hy_min(DW_BT, m - k0);
      // this thread's x and dy slices of the batch stay in its shared memory slots (the stage is
      // refilled only in the next iteration): read twice rather than held in registers
      const uint4* xs = s_buf + (stage * DW_BT * 2 + 0) * DW_THR + tid;  // token k: xs[2 * k * DW_THR]
      const uint4* ys = s_buf + (stage * DW_BT * 2 + 1) * DW_THR + tid;
      bool recompute = false;
#pragma unroll
      for (int k = 0; k < DW_BT; ++k) recompute |= (k < kn) && s_rank[k0 + k] >= W;
      // partial dot products over this thread's 8 columns, reduced over the CTA. Where every pair of
      // the batch has its (a, u) stored, h is known now and dWd takes its axpy here, from the dy just
      // unpacked; a batch that recomputes takes it after the barrier, with the recomputed h. Each
      // thread adds its tokens in list order either way.
      float part[3 * DW_BT];
#pragma unroll
      for (int k = 0; k < DW_BT; ++k) {
        float fy[8];
        hy_unpack8(k < kn ? ys[2 * k * DW_THR] : hy_zero4(), fy);
        float pd = 0.f, pg = 0.f, pu = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) pd = fmaf(fy[e], wd[e], pd);
        if (recompute) {
          float fx[8], fw[8];
          hy_unpack8(k < kn ? xs[2 * k * DW_THR] : hy_zero4(), fx);
          hy_unpack8(wgq, fw);
#pragma unroll
          for (int e = 0; e < 8; ++e) pg = fmaf(fx[e], fw[e], pg);
#if HY_GATED
          hy_unpack8(wuq, fw);
#pragma unroll
          for (int e = 0; e < 8; ++e) pu = fmaf(fx[e], fw[e], pu);
#endif
        } else if (k < kn) {
          const float2 au_k = s_au[k0 + k];
#if HY_GATED
          const float h = au_k.x * au_k.y;
#else
          const float h = au_k.x;
#endif
#pragma unroll
          for (int e = 0; e < 8; ++e) ad[e] = fmaf(h, fy[e], ad[e]);
        }
        part[3 * k + 0] = pd;
        part[3 * k + 1] = pg;
        part[3 * k + 2] = pu;
      }
      // lanes 4k .. 4k + 3 end with token k's warp totals (the same sums as a butterfly per value);
      // the (pg, pu) slots are written only by batches that recompute, the only ones that read them
      const int k_lane = lane >> 2;
      const bool writer = (lane & 3) == 0 && k_lane < DW_BT;
      {
        float v[DW_BT];
#pragma unroll
        for (int k = 0; k < DW_BT; ++k) v[k] = part[3 * k];
        const float total = hy_warp_sum_by_lane<DW_BT>(v, lane);
        if (writer) s_part[warp][3 * k_lane] = total;
      }
      if (recompute) {
#pragma unroll
        for (int c = 1; c < 3; ++c) {
          float v[DW_BT];
#pragma unroll
          for (int k = 0; k < DW_BT; ++k) v[k] = part[3 * k + c];
          const float total = hy_warp_sum_by_lane<DW_BT>(v, lane);
          if (writer) s_part[warp][3 * k_lane + c] = total;
        }
      }
      __syncthreads();
      if (tid < kn) {
        const int k = tid;
        float pd = 0.f, pg = 0.f, pu = 0.f;
#pragma unroll
        for (int w = 0; w < DW_WARPS; ++w) {
          pd += s_part[w][3 * k + 0];
          pg += s_part[w][3 * k + 1];
          pu += s_part[w][3 * k + 2];
        }
        const int t = s_tok[k0 + k];
        const int rank = s_rank[k0 + k];
        float a, u;
        if (rank < W) {
          const float2 e = s_au[k0 + k];
          a = e.x;
          u = e.y;
        } else {
          a = fmaxf(pg, 0.f);
          u = pu;
        }
#if HY_GATED
        const float h = a * u;
        const float dh = pd + __ldg(dl1p) * hy_sign(h);
        const float du = dh * a;
        // ReLU's derivative is the bitmask's (the bf16 gate GEMM's sign), also for a recomputed pair
        // whose float32 pre-activation rounds the other way (a = 0): as in bf16 autograd
        const float dg = dh * u;
#else
        (void)u;
        const float h = a;
        const float dh = pd + __ldg(dl1p) * hy_sign(h);
        const float du = 0.f;
        const float dg = dh;
#endif
        s_coef[k][0] = dg;
        s_coef[k][1] = du;
        s_coef[k][2] = h;
        if (rank < WD) ell_d[(size_t)t * WD + rank] = hy_f2(dg, du);
      }
      if (tid == 0 && sweep > 0 && s_range[2] == 1) atomicAdd(progress, kn);  // the sweep counts one-item walks
      __syncthreads();
#pragma unroll
      for (int k = 0; k < DW_BT; ++k) {
        if (k < kn) {
          const uint4 xq = xs[2 * k * DW_THR];
          hy_axpy8(ag, s_coef[k][0], xq);
#if HY_GATED
          hy_axpy8(au, s_coef[k][1], xq);
#endif
          if (recompute) hy_axpy8(ad, s_coef[k][2], ys[2 * k * DW_THR]);
        }
      }
    }
    }
  }
  hy_cp_wait<0>();
  if (s_range[2] > 1) {  // a split unit: float32 partial rows, written out by hy_dw_finish
    float* acc = ACC + (size_t)j * 3 * D + tid * 8;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      atomicAdd(acc + k, ag[k]);
      atomicAdd(acc + 2 * D + k, ad[k]);
#if HY_GATED
      atomicAdd(acc + D + k, au[k]);
#endif
    }
  } else {
    tw_st16(reinterpret_cast<uint4*>(DWG + (size_t)j * D) + tid, hy_pack8(ag), tw_policy_stream());
#if HY_GATED
    tw_st16(reinterpret_cast<uint4*>(DWU + (size_t)j * D) + tid, hy_pack8(au), tw_policy_stream());
#endif
    tw_st16(reinterpret_cast<uint4*>(DWDT + (size_t)j * D) + tid, hy_pack8(ad), tw_policy_stream());
  }
  __syncthreads();  // shared lists and partials are reused by the next item
  }
}

// hy_dw_plan: one CTA of 1024 threads. item_start[j] = number of work items of the units before j
// (FF + 1 entries), where unit j has max(1, ceil(neuron_counts[j] / part)) items; then hy_dw's sweep
// inputs: the active pairs of the one-item units (item_start[FF + 1]), its progress counter, zeroed
// (item_start[FF + 2]), and the number of one-item units (item_start[FF + 3]). order[i] = unit << 16
// | part (as unsigned bits) of the i-th item hy_dw takes: first the split units' items, by where
// their part lies in the unit's token list (hy_part_bucket), so that the items running together
// read x and dy rows of nearby tokens; then the one-item units in index order (which the token sweep
// keeps together). With by_place = 0 every unit's items follow in index order instead (for A/B
// runs). `rank` (FF entries) is scratch.
constexpr int DW_BUCKETS = 64;
__device__ __forceinline__ int hy_unit_items(int count, int part) { return max(1, (count + part - 1) / part); }
// Bucket of part k of a unit's n_items parts: where the middle of the part lies in the unit's list.
__device__ __forceinline__ int hy_part_bucket(int k, int n_items) { return (2 * k + 1) * DW_BUCKETS / (2 * n_items); }

extern "C" __global__ void __launch_bounds__(1024)
hy_dw_plan(const int* __restrict__ neuron_counts, int* item_start, int* rank, int* order, int FF, int part,
           int by_place) {
  __shared__ int warp_sums[32];
  __shared__ int s_pairs;
  __shared__ int s_bucket[DW_BUCKETS], s_fill[DW_BUCKETS];
  if (threadIdx.x == 0) s_pairs = 0;
  if (threadIdx.x < DW_BUCKETS) s_bucket[threadIdx.x] = s_fill[threadIdx.x] = 0;
  __syncthreads();
  int pairs = 0;  // of the one-item units
  for (int j = threadIdx.x; j <= FF; j += 1024) {
    const int count = j < FF ? __ldg(neuron_counts + j) : 0;
    const int items = j < FF ? hy_unit_items(count, part) : 0;
    item_start[j] = items;
    if (j < FF) rank[j] = items == 1;
    if (items == 1) pairs += count;
    for (int k = 0; items > 1 && k < items; ++k) atomicAdd(&s_bucket[hy_part_bucket(k, items)], 1);
  }
  for (int o = 16; o > 0; o >>= 1) pairs += __shfl_xor_sync(0xFFFFFFFFu, pairs, o);
  if ((threadIdx.x & 31) == 0) atomicAdd(&s_pairs, pairs);
  const int items = tw_block_exclusive_scan<1024>(item_start, FF + 1, warp_sums);
  const int singles = tw_block_exclusive_scan<1024>(rank, FF, warp_sums);  // rank among the one-item units
  const int split_items = items - singles;
  if (threadIdx.x == 0) {  // bucket starts
    int run = 0;
    for (int b = 0; b < DW_BUCKETS; ++b) {
      const int n = s_bucket[b];
      s_bucket[b] = run;
      run += n;
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < FF; j += 1024) {
    const int n_items = item_start[j + 1] - item_start[j];
    if (!by_place) {
      for (int k = 0; k < n_items; ++k) order[item_start[j] + k] = (int)(((unsigned)j << 16) | k);
    } else if (n_items == 1) {
      order[split_items + rank[j]] = (int)((unsigned)j << 16);
    } else {
      for (int k = 0; k < n_items; ++k) {
        const int b = hy_part_bucket(k, n_items);
        order[s_bucket[b] + atomicAdd(&s_fill[b], 1)] = (int)(((unsigned)j << 16) | k);
      }
    }
  }
  if (threadIdx.x == 0) {
    item_start[FF + 1] = s_pairs;
    item_start[FF + 2] = 0;
    item_start[FF + 3] = singles;
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
