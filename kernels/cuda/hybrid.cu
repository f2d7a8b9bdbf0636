// Hybrid-format training kernels for the ReLU-gated (or plain ReLU) sparse FFN: exact forward and
// backward over the active (token, unit) pairs only. See kernels/README_hybrid.md for the format.
//
//   g = X Wg^T (cuBLAS, outside), a = ReLU(g), u = x.Wu_j at active pairs, h = a*u, y = H Wd^T
//   dh = dy.Wd_j + dl1*sign(h), du = dh*a, dg = dh*u*(g>0), dX = dg Wg + du Wu,
//   dWg = dg^T X, dWu = du^T X, dWd = dy^T H.
// Non-gated (HY_GATED 0): h = ReLU(x Wu^T); the "gate-role" weight WG is then Wu.
//
// Kernels (one module per (HY_D, HY_GATED, HY_DTYPE)):
//   hy_pack       G [N, FF] -> row bitmask mrow [N, FF/32] + per-256-tile exclusive rank prefix
//   hy_forward    warp per token (long rows split over ROW_PARTS warps): u, h, y, ELL (a, u)
//                 for ranks < W, l1 per token, stats
//   hy_rows_finish  adds the float32 parts of the long rows (y and stats, or dX)
//   hy_transpose  mrow -> column bitmask mcol [FF, ceil(N/32)] (the neuron-major index)
//   hy_dwy        team of warps (one up to d_model 2048) per work item (a unit's tokens, split into
//                 parts where it fires on many): dh, dg, du for its tokens, dWd^T_j (fp32 accumulation
//                 in registers; the parts of a split unit add fp32 rows), and the ELL of (dg, du), WD
//                 wide (WD >= W: it lives only through the backward)
//   hy_dwx        warp per (work item, column slice): dWg_j, dWu_j from that ELL
//   hy_dw_plan    work items per unit from the forward's neuron counts (one CTA, a scan), and the
//                 order hy_dwy and hy_dwx take them in
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

extern "C" __global__ void __launch_bounds__(256)
hy_pack(const tw_u16* __restrict__ G, tw_u32* __restrict__ mrow, int* __restrict__ tprefix,
        float2* __restrict__ ell, int N, int FF, int W) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= N) return;
  const int nw = FF >> 5, nt = (FF + 255) >> 8;
  const tw_u16* g = G + (size_t)t * FF;
  const tw_u64 pol_first = tw_policy_stream();
  int base = 0;
  for (int T = 0; T < nt; ++T) {
    const int c0 = T * 256 + lane * 8;
    tw_u32 m8 = 0;
    float f[8];
    if (c0 < FF) {
      const uint4 q = tw_ld16(reinterpret_cast<const uint4*>(g + c0), pol_first);
      hy_unpack8(q, f);
#pragma unroll
      for (int k = 0; k < 8; ++k) m8 |= (tw_u32)(f[k] > 0.f) << k;
    }
    // ranks of this lane's active columns: base + active columns of lower lanes + lower bits
    const int cnt8 = __popc(m8);
    int incl = tw_warp_scan(cnt8, lane);
    int r = base + incl - cnt8;
    if (r < W) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if ((m8 >> k) & 1u) {
          if (r < W) ell[(size_t)t * W + r] = hy_f2(f[k], 0.f);
          ++r;
        }
      }
    }
    tw_u32 w = m8 << (8 * (lane & 3));
    w |= __shfl_xor_sync(TW_FULL_MASK, w, 1);
    w |= __shfl_xor_sync(TW_FULL_MASK, w, 2);
    const int word = T * 8 + (lane >> 2);
    if ((lane & 3) == 0 && word < nw) mrow[(size_t)t * nw + word] = w;
    if (lane == 0) tprefix[(size_t)t * nt + T] = base;
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
// hy_transpose: mrow [N, nw] -> mcol [FF, WC], WC = ceil(N/32). Warp per (32-token block, word).

extern "C" __global__ void __launch_bounds__(256)
hy_transpose(const tw_u32* __restrict__ mrow, tw_u32* __restrict__ mcol, int N, int FF) {
  const int lane = threadIdx.x & 31;
  const int nw = FF >> 5, WC = (N + 31) >> 5;
  const int b = blockIdx.x;
  const int w = blockIdx.y * 8 + (threadIdx.x >> 5);
  if (w >= nw) return;
  const int t = b * 32 + lane;
  const tw_u32 v = (t < N) ? __ldg(mrow + (size_t)t * nw + w) : 0u;
  tw_u32 out = 0;
#pragma unroll
  for (int c = 0; c < 32; ++c) {
    const tw_u32 bc = __ballot_sync(TW_FULL_MASK, (v >> c) & 1u);
    if (lane == c) out = bc;
  }
  mcol[(size_t)(w * 32 + lane) * WC + b] = out;
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
// (PARTS: warps a split row takes; hy_fill_au, which needs no partial sums, splits further.)
template <int PARTS = ROW_PARTS>
__device__ __forceinline__ hy_work hy_row_work(const int* __restrict__ order, const int* __restrict__ split_count,
                                               int R, int N) {
  const int warp = threadIdx.x >> 5;
  const int split = hy_min(hy_min(split_count ? __ldg(split_count) : 0, R), N);
  const int part_ctas = R * (PARTS / FWD_WARPS);
  hy_work w;
  if ((int)blockIdx.x < part_ctas) {
    w.index = blockIdx.x / (PARTS / FWD_WARPS);
    w.part = (blockIdx.x % (PARTS / FWD_WARPS)) * FWD_WARPS + warp;
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
  uint4 xr[NC];
  {
    const uint4* xrow = reinterpret_cast<const uint4*>(X + (size_t)t * D);
#pragma unroll
    for (int c = 0; c < NC; ++c) xr[c] = tw_ld16(xrow + c * 32 + lane, pol_s);
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
    for (int c = 0; c < NC; ++c) p += hy_dot8(xr[c], wu[c]);
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

// (dg, du) of pair (t, j) recomputed by a warp from x_t, dy_t and the unit's three weight rows
// (every lane gets them): for pairs past the (dg, du) ELL.
__device__ __forceinline__ float2 hy_pair_grads(const tw_u16* __restrict__ X, const tw_u16* __restrict__ DY,
                                                const tw_u16* __restrict__ WG, const tw_u16* __restrict__ WU,
                                                const tw_u16* __restrict__ WDT, int t, int j, float dl1) {
  const int lane = threadIdx.x & 31;
  const uint4* xrow = reinterpret_cast<const uint4*>(X + (size_t)t * D);
  const uint4* dyrow = reinterpret_cast<const uint4*>(DY + (size_t)t * D);
  const uint4* wdr = reinterpret_cast<const uint4*>(WDT + (size_t)j * D);
  const uint4* wgr = reinterpret_cast<const uint4*>(WG + (size_t)j * D);
  float pd = 0.f, pg = 0.f;  // loops left rolled: a rare path, whose registers every caller would pay
#pragma unroll 1
  for (int c = 0; c < NC; ++c) {
    pd += hy_dot8(__ldg(dyrow + c * 32 + lane), __ldg(wdr + c * 32 + lane));
    pg += hy_dot8(__ldg(xrow + c * 32 + lane), __ldg(wgr + c * 32 + lane));
  }
  pd = hy_warp_sum(pd);
  const float a = fmaxf(hy_warp_sum(pg), 0.f);
#if HY_GATED
  const uint4* wur = reinterpret_cast<const uint4*>(WU + (size_t)j * D);
  float pu = 0.f;
#pragma unroll 1
  for (int c = 0; c < NC; ++c) pu += hy_dot8(__ldg(xrow + c * 32 + lane), __ldg(wur + c * 32 + lane));
  const float u = hy_warp_sum(pu);
  const float dh = pd + dl1 * hy_sign(a * u);
  return hy_f2((a > 0.f) ? dh * u : 0.f, dh * a);
#else
  (void)WU;
  const float dh = pd + dl1 * hy_sign(a);
  return hy_f2((a > 0.f) ? dh : 0.f, 0.f);
#endif
}

// acc += the pairs of row t in the words w with w % step == sel (hy_row_pairs)
__device__ __forceinline__ void hy_dx_row(float acc[NC][8], int t, int sel, int step, const tw_u16* __restrict__ X,
                                          const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
                                          const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT,
                                          const tw_u32* __restrict__ mrow, const float2* __restrict__ ell_d,
                                          float dl1, int nw, int W) {
  const int lane = threadIdx.x & 31;
  const tw_u64 pol_w = tw_policy_keep();
  hy_row_pairs(mrow + (size_t)t * nw, nw, sel, step, [&](const int j, const int rank) {
    float dg, du;
    if (rank < W) {
      const float2 e = __ldg(ell_d + (size_t)t * W + rank);
      dg = e.x;
      du = e.y;
    } else {  // overflow pair: recomputed from x, dy and the unit's weight rows
      const float2 g = hy_pair_grads(X, DY, WG, WU, WDT, t, j, dl1);
      dg = g.x;
      du = g.y;
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
// hy_fill_au: (a, u) of the pairs of rank W <= rank < WD (rows of more active units than the saved
// ELL holds) into their (dg, du) ELL slots, for hy_dwy to read there (it then overwrites them with
// (dg, du)). Token-major: x_t is read once and the weight rows stream at L2 speed, where hy_dwy,
// recomputing them a token at a time, took ~20x the time of a stored pair. Warp per row; each pair is
// independent (no partial sums), so the up to FILL_ROWS longest rows of the row plan are split over
// FILL_PARTS warps by words, finer than hy_forward's: the models' longest rows have thousands of
// pairs past W. Rows of at most W units return after counting.
constexpr int FILL_PARTS = 32;
static_assert(FILL_PARTS % FWD_WARPS == 0 && (FILL_PARTS & (FILL_PARTS - 1)) == 0, "FILL_PARTS: power of two");

extern "C" __global__ void __launch_bounds__(FWD_WARPS * 32, 1)  // 1: ptxas's own cap spilled at d_model 512
hy_fill_au(const tw_u16* __restrict__ X, const tw_u16* __restrict__ WG, const tw_u16* __restrict__ WU,
           const tw_u32* __restrict__ mrow, const int* __restrict__ tprefix, float2* __restrict__ ell_d,
           const int* __restrict__ order, const int* __restrict__ split_count, int R, int N, int FF, int W, int WD) {
  const int lane = threadIdx.x & 31;
  const hy_work work = hy_row_work<FILL_PARTS>(order, split_count, R, N);
  if (work.t < 0) return;
  const int t = work.t, nw = FF >> 5, nt = (FF + 255) >> 8;
  const tw_u32* mr = mrow + (size_t)t * nw;
  const int last = lane < nw - (nt - 1) * 8 ? __popc(__ldg(mr + (nt - 1) * 8 + lane)) : 0;
  if (__ldg(tprefix + (size_t)t * nt + nt - 1) + hy_warp_sum(last) <= W) return;  // the row's count
  const tw_u64 pol_w = tw_policy_keep();
  uint4 xr[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) xr[c] = __ldg(reinterpret_cast<const uint4*>(X + (size_t)t * D) + c * 32 + lane);
  hy_row_pairs(mr, nw, work.part < 0 ? 0 : work.part, work.part < 0 ? 1 : FILL_PARTS, [&](const int j, const int rank) {
    if (rank < W || rank >= WD) return;
    const uint4* wgr = reinterpret_cast<const uint4*>(WG + (size_t)j * D) + lane;
    float pg = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) pg += hy_dot8(xr[c], tw_ld16(wgr + c * 32, pol_w));
#if HY_GATED
    const uint4* wur = reinterpret_cast<const uint4*>(WU + (size_t)j * D) + lane;
    float pu = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) pu += hy_dot8(xr[c], tw_ld16(wur + c * 32, pol_w));
    pu = hy_warp_sum(pu);
#else
    (void)WU;
    const float pu = 0.f;
#endif
    pg = hy_warp_sum(pg);
    if (lane == 0) ell_d[(size_t)t * WD + rank] = hy_f2(fmaxf(pg, 0.f), pu);
  });
}

// ---------------------------------------------------------------------------------------------
// Weight gradients, unit-major, in two passes over each work item's tokens (an item: unit j's
// tokens with list positions [k*S, (k+1)*S) as hy_dw_plan orders them, the last item of a unit
// taking the rest, so that a unit firing on many tokens is split over several warps instead of
// making one the kernel's tail):
//   hy_dwy  a team of DWY_TEAM warps per item (one warp up to d_model 2048) holding Wd_j in
//           registers: dh = dy_t.Wd_j + dl1 sign(h) and then dg, du for each token; dWd^T_j =
//           sum_t h dy_t; the (dg, du) ELL, WD wide (WD >= W: it lives only through the backward).
//   hy_dwx  a warp per (item, slice of DWX_NC x 256 columns): dWg_j = sum_t dg x_t, dWu_j = sum_t
//           du x_t on its columns, (dg, du) from the ELL (recomputed past it, as hy_dx does).
// One kernel for all three rows (the design up to v16) held 24 KB of float32 accumulators a unit:
// about two units an SM ran at once, so each wave of running units read x and dy (N x 4 KB each)
// from DRAM again, and its dot products needed a CTA-wide reduction with two barriers every few
// tokens. Split this way a warp holds 8 KB (hy_dwy) or 2 x its slice (hy_dwx), four to eight times
// the items run at once, each pass reads only one of dy and x, and neither has a CTA barrier
// (hy_dwy's teams past d_model 2048 aside). The items of a one-item unit write its rows; the items
// of a split unit add float32 rows into ACC (hy_dw_zero, hy_dw_finish). Pairs of rank >= W in their
// row (past the forward's (a, u) ELL) have a, u recomputed in hy_dwy from x_t, Wg_j and Wu_j.
// Token sweep (`sweep` > 0, the number of items running at once): x and dy do not fit L2, and every
// unit's tokens are spread over all N. Walked from token 0, the running items drift apart and read
// all of x and dy at once. So a one-item unit starts its walk at the token where the running items
// are now: the position a walk would have reached if every item had started at the kernel's start,
// i.e. the pairs the one-item walks have done (`progress`) over the pairs all running items do in the
// time of one walk (sweep x the mean pairs of a one-item unit), modulo 1, times N; it then wraps
// around. The running items so walk through the same tokens together. Only the order changes: every
// token of the unit is still visited once. Split units cannot sweep (a part is a fixed range of its
// unit's token list); hy_dw_plan puts their parts first, ordered by where each lies in its unit's
// list, so that the parts running together read rows of nearby tokens.

constexpr int DW_LIST = 128;  // tokens a warp lists in shared memory at a time
constexpr int DW_WPL = 4;     // column-bitmask words per lane per step of a walk
#ifndef HY_DWX_NC
#define HY_DWX_NC 4
#endif
// hy_dwy: warps per item, the fewest that split the row's chunks evenly with at most 8 a warp
// (64 + 64 float registers for Wd_j and the accumulators)
__host__ __device__ constexpr int hy_dwy_team(int nc, int t) { return (nc % t == 0 && nc / t <= 8) ? t : hy_dwy_team(nc, t + 1); }
constexpr int DWY_TEAM = hy_dwy_team(NC, 1);
constexpr int DWY_NC = NC / DWY_TEAM;                    // chunks of 256 columns a warp
constexpr int DWY_WARPS = DWY_TEAM == 1 ? 4 : DWY_TEAM;  // a CTA: four one-warp items, or one team
constexpr int DWY_ITEMS = DWY_WARPS / DWY_TEAM;          // items a CTA runs at once
constexpr int DWX_NC = HY_DWX_NC < NC ? HY_DWX_NC : NC;  // hy_dwx: chunks of 256 columns a warp
constexpr int DWX_SLICES = (NC + DWX_NC - 1) / DWX_NC;
constexpr int DWX_WARPS = 4;

// Bitmask word at position `wr` of a walk that starts at word `first` and wraps around at WC.
__device__ __forceinline__ int hy_walk_word(int wr, int first, int WC) {
  return wr + first < WC ? wr + first : wr + first - WC;
}

struct hy_item {
  int unit;
  int lo, hi;   // list positions of the item's tokens
  int n_items;  // items of its unit
  int first;    // the walk's first bitmask word
};

// Item i of hy_dw_plan's order; the sweep's phase is read by lane 0 and shared (the lanes of a
// warp, or the warps of a team, must walk the same tokens).
__device__ __forceinline__ hy_item hy_item_at(const int* __restrict__ item_start, const int* __restrict__ order, int i,
                                              const int* progress, int sweep, int S, int WC, int FF) {
  const unsigned e = (unsigned)__ldg(order + i);
  hy_item it;
  it.unit = (int)(e >> 16);
  const int k = (int)(e & 0xFFFFu);
  it.n_items = __ldg(item_start + it.unit + 1) - __ldg(item_start + it.unit);
  it.lo = k * S;
  it.hi = (k == it.n_items - 1) ? 0x7FFFFFFF : (k + 1) * S;
  int first = 0;
  if (sweep > 0 && it.n_items == 1 && (threadIdx.x & 31) == 0) {
    // a one-item walk covers all N tokens in the time its warp does its unit's pairs: the mean over
    // the one-item units (split units' longer items would make the phase lag the walks)
    const float per_item = (float)__ldg(item_start + FF + 1) / (float)max(__ldg(item_start + FF + 3), 1);
    float phase = (float)*(volatile const int*)progress / fmaxf((float)sweep * per_item, 1.f);
    phase -= floorf(phase);
    first = min((int)(phase * (float)WC), WC - 1);
  }
  it.first = __shfl_sync(TW_FULL_MASK, first, 0);
  return it;
}

// Calls visit(list, m) with the item's tokens in walk order (list positions [lo, hi) of the unit's
// column bitmask mc, walked from word `first`), at most DW_LIST at a time in the warp's list[].
template <class Visit>
__device__ __forceinline__ void hy_item_tokens(const tw_u32* __restrict__ mc, int WC, const hy_item& it, int* list,
                                               Visit&& visit) {
  const int lane = threadIdx.x & 31;
  int seen = 0;  // tokens of the unit in earlier steps
  for (int cw = 0; cw < WC && seen < it.hi; cw += 32 * DW_WPL) {
    tw_u32 words[DW_WPL];
    int cnt = 0;
#pragma unroll
    for (int q = 0; q < DW_WPL; ++q) {
      const int wr = cw + lane * DW_WPL + q;
      words[q] = wr < WC ? __ldg(mc + hy_walk_word(wr, it.first, WC)) : 0u;
      cnt += __popc(words[q]);
    }
    const int incl = tw_warp_scan(cnt, lane);
    const int total = __shfl_sync(TW_FULL_MASK, incl, 31);
    const int off = incl - cnt;  // step position of this lane's first token
    const int begin = max(it.lo - seen, 0), end = min(total, it.hi - seen);
    for (int base = begin; base < end; base += DW_LIST) {
      const int m = min(DW_LIST, end - base);
      if (off < base + m && off + cnt > base) {
        int p = off;
#pragma unroll
        for (int q = 0; q < DW_WPL; ++q) {
          tw_u32 wq = words[q];
          const int wi = hy_walk_word(cw + lane * DW_WPL + q, it.first, WC);
          while (wq) {
            const int bit = __ffs(wq) - 1;
            wq &= wq - 1u;
            if (p >= base && p < base + m) list[p - base] = (wi << 5) + bit;
            ++p;
          }
        }
      }
      __syncwarp();
      visit(list, m);
      __syncwarp();
    }
    seen += total;
  }
}

template <bool V>
struct hy_bool {
  static constexpr bool value = V;
};

// Calls body(k, rows, even) for k = 0 .. m - 1, rows = the lane's NCK 16-byte slices of token
// list[k]'s row (src + t * D / 8 + c * 32; only chunks c with c0 + c < NC), loaded one token ahead
// into two register buffers that swap roles (unrolled by two: no copies between them). `even` is
// hy_bool<k % 2 == 0>: work done every 32 tokens needs to be in the even copy of the body only.
template <int NCK, class Body>
__device__ __forceinline__ void hy_token_rows(const uint4* src, int c0, const int* list, int m, Body&& body) {
  uint4 b0[NCK], b1[NCK];
  auto load = [&](uint4 (&b)[NCK], int k) {
    const uint4* row = src + (size_t)list[k] * (D / 8);
#pragma unroll
    for (int c = 0; c < NCK; ++c)
      if (NC % NCK == 0 || c0 + c < NC) b[c] = __ldg(row + c * 32);
  };
  load(b0, 0);
#pragma unroll 1
  for (int k = 0; k < m; k += 2) {
    if (k + 1 < m) load(b1, k + 1);
    body(k, b0, hy_bool<true>());
    if (k + 1 == m) break;
    if (k + 2 < m) load(b0, k + 2);
    body(k + 1, b1, hy_bool<false>());
  }
}

// Sum over the warps of a hy_dwy team of v (each warp's total, the same in all its lanes); the
// partials alternate between two slots so that one barrier a token suffices.
__device__ __forceinline__ float4 hy_team_sum(float4 v, float4 (*s_red)[DWY_TEAM], int& parity) {
  if (DWY_TEAM == 1) return v;
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) s_red[parity][warp] = v;
  __syncthreads();
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int w = 0; w < DWY_TEAM; ++w) {
    const float4 p = s_red[parity][w];
    s.x += p.x;
    s.y += p.y;
    s.z += p.z;
  }
  parity ^= 1;
  return s;
}

__device__ __forceinline__ void hy_wd8(const float4 (&w2)[2][32], int lane, float w[8]) {
  const float4 lo = w2[0][lane], hi = w2[1][lane];
  w[0] = lo.x; w[1] = lo.y; w[2] = lo.z; w[3] = lo.w;
  w[4] = hi.x; w[5] = hi.y; w[6] = hi.z; w[7] = hi.w;
}

extern "C" __global__ void __launch_bounds__(DWY_WARPS * 32, 1)  // 1: ptxas's own cap spilled at d_model 256
hy_dwy(const tw_u16* __restrict__ X, const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
       const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT, const tw_u32* __restrict__ mrow,
       const tw_u32* __restrict__ mcol, const int* __restrict__ tprefix, const float2* __restrict__ ell,
       const float* __restrict__ dl1p, float2* __restrict__ ell_d, tw_u16* __restrict__ DWDT,
       const int* __restrict__ item_start, const int* __restrict__ order, float* __restrict__ ACC,
       int* __restrict__ progress, int sweep, int S, int N, int FF, int W, int WD) {
  __shared__ int s_list[DWY_WARPS][DW_LIST];
  __shared__ float4 s_red[2][DWY_TEAM];
  // Wd_j as float32, each lane's own slots: held in registers beside the accumulators and two dy
  // buffers, ptxas kept it packed and unpacked it again for every token (64 more instructions)
  __shared__ float4 s_wd[DWY_WARPS][DWY_NC][2][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = warp / DWY_TEAM;              // the CTA's item this warp works on
  const int c0 = (warp % DWY_TEAM) * DWY_NC;     // this warp's first chunk of the row
  const bool leader = warp % DWY_TEAM == 0 && lane == 0;
  float4(*wd)[2][32] = s_wd[warp];
  const int nw = FF >> 5, nt = (FF + 255) >> 8, WC = (N + 31) >> 5;
  const float dl1 = __ldg(dl1p);
  const tw_u64 pol_s = tw_policy_stream();
  int parity = 0;

#pragma unroll 1
  for (int i = blockIdx.x * DWY_ITEMS + slot; i < __ldg(item_start + FF); i += gridDim.x * DWY_ITEMS) {
    hy_item it = hy_item_at(item_start, order, i, progress, sweep, S, WC, FF);
    if (DWY_TEAM > 1) {  // the team walks from its first warp's phase
      __shared__ int s_first;
      if (threadIdx.x == 0) s_first = it.first;
      __syncthreads();
      it.first = s_first;
      __syncthreads();
    }
    const int j = it.unit;
    float acc[DWY_NC][8];
#pragma unroll
    for (int c = 0; c < DWY_NC; ++c) {
      float w[8];
      hy_unpack8(tw_ld16(reinterpret_cast<const uint4*>(WDT + (size_t)j * D) + (c0 + c) * 32 + lane, pol_s), w);
      wd[c][0][lane] = make_float4(w[0], w[1], w[2], w[3]);
      wd[c][1][lane] = make_float4(w[4], w[5], w[6], w[7]);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[c][k] = 0.f;
    }
    hy_item_tokens(mcol + (size_t)j * WC, WC, it, s_list[warp], [&](const int* list, const int m) {
      int t_l = 0, rank_l = 0;  // lane l: token 32 * (k / 32) + l's token and rank, and its (a, u)
      float2 au_l = hy_f2(0.f, 0.f);
      const uint4* dy_cols = reinterpret_cast<const uint4*>(DY) + c0 * 32 + lane;
      hy_token_rows<DWY_NC>(dy_cols, c0, list, m, [&](const int k, const uint4 (&dy)[DWY_NC], auto even) {
        if (even.value && (k & 31) == 0 && k + lane < m) {  // (a, u) from the forward's ELL, or hy_fill_au's
          t_l = list[k + lane];
          rank_l = hy_rank(mrow, tprefix, t_l, j, nw, nt);
          au_l = rank_l < W    ? __ldg(ell + (size_t)t_l * W + rank_l)
                 : rank_l < WD ? ell_d[(size_t)t_l * WD + rank_l]
                               : hy_f2(0.f, 0.f);
        }
        const int t = __shfl_sync(TW_FULL_MASK, t_l, k & 31);
        const int rank = __shfl_sync(TW_FULL_MASK, rank_l, k & 31);
        float a = __shfl_sync(TW_FULL_MASK, au_l.x, k & 31);
        float u = __shfl_sync(TW_FULL_MASK, au_l.y, k & 31);
        const bool known = rank < WD;
        float4 p = make_float4(0.f, 0.f, 0.f, 0.f);  // dy.Wd_j, and where (a, u) are not known x.Wg_j, x.Wu_j
#if HY_GATED
        const float h = a * u;
#else
        const float h = a;
#endif
        if (known) {  // dWd's axpy beside the dot, from the dy just unpacked
#pragma unroll
          for (int c = 0; c < DWY_NC; ++c) {
            float fy[8], w[8];
            hy_unpack8(dy[c], fy);
            hy_wd8(wd[c], lane, w);
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              s = fmaf(fy[e], w[e], s);
              acc[c][e] = fmaf(h, fy[e], acc[c][e]);
            }
            p.x += s;
          }
        } else {
#pragma unroll
          for (int c = 0; c < DWY_NC; ++c) {
            float fy[8], w[8];
            hy_unpack8(dy[c], fy);
            hy_wd8(wd[c], lane, w);
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) s = fmaf(fy[e], w[e], s);
            p.x += s;
          }
        }
        if (!known) {  // past both ELLs (a row of over WD units): recompute a, u; rolled, being rare
          const uint4* xr = reinterpret_cast<const uint4*>(X + (size_t)t * D) + c0 * 32 + lane;
          const uint4* wgr = reinterpret_cast<const uint4*>(WG + (size_t)j * D) + c0 * 32 + lane;
#if HY_GATED
          const uint4* wur = reinterpret_cast<const uint4*>(WU + (size_t)j * D) + c0 * 32 + lane;
#endif
#pragma unroll 1
          for (int c = 0; c < DWY_NC; ++c) {
            const uint4 xq = __ldg(xr + c * 32);
            p.y += hy_dot8(xq, __ldg(wgr + c * 32));
#if HY_GATED
            p.z += hy_dot8(xq, __ldg(wur + c * 32));
#endif
          }
          p.y = hy_warp_sum(p.y);
          p.z = hy_warp_sum(p.z);
        }
        p.x = hy_warp_sum(p.x);
        p = hy_team_sum(p, s_red, parity);
        if (!known) {
          a = fmaxf(p.y, 0.f);
#if HY_GATED
          u = p.z;
          const float hr = a * u;
#else
          const float hr = a;
#endif
#pragma unroll
          for (int c = 0; c < DWY_NC; ++c) hy_axpy8(acc[c], hr, dy[c]);
        }
#if HY_GATED
        const float dh = p.x + dl1 * hy_sign(a * u);
        const float2 grads = hy_f2((a > 0.f) ? dh * u : 0.f, dh * a);
#else
        const float dh = p.x + dl1 * hy_sign(a);
        const float2 grads = hy_f2((a > 0.f) ? dh : 0.f, 0.f);
#endif
        if (leader && known) ell_d[(size_t)t * WD + rank] = grads;  // the slot's (a, u) were read above
      });
      if (leader && sweep > 0 && it.n_items == 1) atomicAdd(progress, m);  // the sweep counts one-item walks
    });
    if (it.n_items > 1) {  // a split unit: float32 partial rows, written out by hy_dw_finish
      float* rows = ACC + (size_t)j * 3 * D + 2 * D;
#pragma unroll
      for (int c = 0; c < DWY_NC; ++c)
#pragma unroll
        for (int k = 0; k < 8; ++k) atomicAdd(rows + ((c0 + c) * 32 + lane) * 8 + k, acc[c][k]);
    } else {
#pragma unroll
      for (int c = 0; c < DWY_NC; ++c)
        tw_st16(reinterpret_cast<uint4*>(DWDT + (size_t)j * D) + (c0 + c) * 32 + lane, hy_pack8(acc[c]), pol_s);
    }
  }
}

// hy_dwx: work w = slice * items + item (all items' first slice, then their second, ...: the warps
// running together read the same columns of x).
// 3 CTAs an SM on Hopper (168 registers): left alone, ptxas aimed at 4 for the non-gated variant
// and spilled; sm_80's code needs a few more
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define HY_DWX_MINB 2
#else
#define HY_DWX_MINB 3
#endif
extern "C" __global__ void __launch_bounds__(DWX_WARPS * 32, HY_DWX_MINB)
hy_dwx(const tw_u16* __restrict__ X, const tw_u16* __restrict__ DY, const tw_u16* __restrict__ WG,
       const tw_u16* __restrict__ WU, const tw_u16* __restrict__ WDT, const tw_u32* __restrict__ mrow,
       const tw_u32* __restrict__ mcol, const int* __restrict__ tprefix, const float2* __restrict__ ell_d,
       const float* __restrict__ dl1p, tw_u16* __restrict__ DWG, tw_u16* __restrict__ DWU,
       const int* __restrict__ item_start, const int* __restrict__ order, float* __restrict__ ACC,
       int* __restrict__ progress, int sweep, int S, int N, int FF, int WD) {
  __shared__ int s_list[DWX_WARPS][DW_LIST];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nw = FF >> 5, nt = (FF + 255) >> 8, WC = (N + 31) >> 5;
  const float dl1 = __ldg(dl1p);
  const tw_u64 pol_s = tw_policy_stream();
  const int items = __ldg(item_start + FF);

#pragma unroll 1
  for (int w = blockIdx.x * DWX_WARPS + warp; w < items * DWX_SLICES; w += gridDim.x * DWX_WARPS) {
    const int slice = w / items;
    const hy_item it = hy_item_at(item_start, order, w - slice * items, progress, sweep, S, WC, FF);
    const int j = it.unit;
    const int c0 = slice * DWX_NC;
    float ag[DWX_NC][8];
#if HY_GATED
    float au[DWX_NC][8];
#endif
#pragma unroll
    for (int c = 0; c < DWX_NC; ++c)
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        ag[c][k] = 0.f;
#if HY_GATED
        au[c][k] = 0.f;
#endif
      }
    hy_item_tokens(mcol + (size_t)j * WC, WC, it, s_list[warp], [&](const int* list, const int m) {
      int t_l = 0;  // lane l: token 32 * (k / 32) + l, and its (dg, du)
      float2 g_l = hy_f2(0.f, 0.f);
      const uint4* x_cols = reinterpret_cast<const uint4*>(X) + c0 * 32 + lane;
      hy_token_rows<DWX_NC>(x_cols, c0, list, m, [&](const int k, const uint4 (&x)[DWX_NC], auto even) {
        if (even.value && (k & 31) == 0) {
          bool past = false;  // past the ELL (a row of over WD units): recomputed by the whole warp
          if (k + lane < m) {
            t_l = list[k + lane];
            const int rank = hy_rank(mrow, tprefix, t_l, j, nw, nt);
            past = rank >= WD;
            g_l = past ? hy_f2(0.f, 0.f) : __ldg(ell_d + (size_t)t_l * WD + rank);
          }
          for (unsigned todo = __ballot_sync(TW_FULL_MASK, past); todo; todo &= todo - 1u) {
            const int src = __ffs(todo) - 1;
            const float2 g = hy_pair_grads(X, DY, WG, WU, WDT, __shfl_sync(TW_FULL_MASK, t_l, src), j, dl1);
            if (lane == src) g_l = g;
          }
        }
        const float2 g = hy_f2(__shfl_sync(TW_FULL_MASK, g_l.x, k & 31), __shfl_sync(TW_FULL_MASK, g_l.y, k & 31));
#pragma unroll
        for (int c = 0; c < DWX_NC; ++c) {
          if (NC % DWX_NC == 0 || c0 + c < NC) {
            float fx[8];
            hy_unpack8(x[c], fx);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              ag[c][e] = fmaf(g.x, fx[e], ag[c][e]);
#if HY_GATED
              au[c][e] = fmaf(g.y, fx[e], au[c][e]);
#endif
            }
          }
        }
      });
      if (lane == 0 && sweep > 0 && it.n_items == 1) atomicAdd(progress, m);
    });
#pragma unroll
    for (int c = 0; c < DWX_NC; ++c) {
      if (NC % DWX_NC != 0 && c0 + c >= NC) continue;
      const int col = ((c0 + c) * 32 + lane) * 8;
      if (it.n_items > 1) {
        float* rows = ACC + (size_t)j * 3 * D + col;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          atomicAdd(rows + k, ag[c][k]);
#if HY_GATED
          atomicAdd(rows + D + k, au[c][k]);
#endif
        }
      } else {
        tw_st16(DWG + (size_t)j * D + col, hy_pack8(ag[c]), pol_s);
#if HY_GATED
        tw_st16(DWU + (size_t)j * D + col, hy_pack8(au[c]), pol_s);
#endif
      }
    }
  }
}

// hy_dw_plan: one CTA of 1024 threads. item_start[j] = number of work items of the units before j
// (FF + 1 entries), where unit j has max(1, floor(neuron_counts[j] / part)) items; then the sweep's
// inputs: the active pairs of the one-item units (item_start[FF + 1]), hy_dwy's and hy_dwx's progress
// counters, zeroed (item_start[FF + 2], item_start[FF + 4]), and the number of one-item units
// (item_start[FF + 3]). order[i] = unit << 16 | part (as unsigned bits) of the i-th item taken:
// first the split units' items, by where their part lies in the unit's token list (hy_part_bucket),
// so that the items running together read x and dy rows of nearby tokens; then the one-item units in
// index order (which the token sweep keeps together). With by_place = 0 every unit's items follow in
// index order instead (for A/B runs). `rank` (FF entries) is scratch.
constexpr int DW_BUCKETS = 64;
// A unit on count tokens: items of `part` tokens, the last taking the rest (part to 2 * part - 1 tokens).
__device__ __forceinline__ int hy_unit_items(int count, int part) { return max(1, count / part); }
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
    item_start[FF + 4] = 0;
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
