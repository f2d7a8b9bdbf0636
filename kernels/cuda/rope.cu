// Rotary position embedding (rotate-half convention) fused with the split of the attention's qkv
// projection: one pass each way instead of the ~10 elementwise passes (float32 copies, a cat, a neg)
// of the PyTorch formula, and the projection's output is not kept alive for the backward.
//
//   rope_fwd: QKV [B, S, 3, H, HD] -> Q, K, V, each [B, S, H, HD] in memory (used as [B, H, S, HD]
//             views: SDPA then keeps that layout for its output, which reshapes to [B, S, H HD] for
//             the output projection without a copy): q and k rotated by the angles of their
//             position, v copied.
//             out[i] = x[i] cos - x[i + HD/2] sin,  out[i + HD/2] = x[i + HD/2] cos + x[i] sin
//   rope_bwd: dQ, dK, dV [B, H, S, HD] (any strides over B, H, S; HD contiguous) -> dQKV
//             [B, S, 3, H, HD]: the transposed rotation (by minus the angle), dv copied.
// COS / SIN: float32 [S, HD] tables whose two halves are equal (sparse_llm.model.rope.rope_tables);
// the products are formed in float32 and rounded once to the 16-bit type.
// Block (HD / 4, rows): thread (p, row) takes elements 2p, 2p + 1 of both halves of one head row, as
// packed 16-bit pairs (HD % 4 == 0); blockIdx.x * blockDim.y + threadIdx.y is the row of QKV.
// TW_DTYPE 0 = bf16, 1 = fp16. No CUDA headers: compiles with NVRTC (CuPy) and nvcc alike.

#include "twell_common.cuh"

struct rp_row {
  int b, s, which, h;
};

// Head row r of QKV in its memory order (b, s, which, h).
__device__ __forceinline__ rp_row rp_unflatten(unsigned r, unsigned S, unsigned H) {
  rp_row w;
  w.h = (int)(r % H);
  r /= H;
  w.which = (int)(r % 3u);
  r /= 3u;
  w.s = (int)(r % S);
  w.b = (int)(r / S);
  return w;
}

// The pair (2p, 2p + 1) of both halves rotated by the angles of position s (sign -1: by minus them).
__device__ __forceinline__ void rp_rotate(tw_u32& first, tw_u32& second, const float* __restrict__ COS,
                                          const float* __restrict__ SIN, int s, int HD, int p, float sign) {
  const float2 c = *reinterpret_cast<const float2*>(COS + (size_t)s * HD + 2 * p);
  const float2 n = *reinterpret_cast<const float2*>(SIN + (size_t)s * HD + 2 * p);
  const float x1lo = tw_lo(first), x1hi = tw_hi(first), x2lo = tw_lo(second), x2hi = tw_hi(second);
  const float slo = sign * n.x, shi = sign * n.y;
  first = tw_pack2(x1lo * c.x - x2lo * slo, x1hi * c.y - x2hi * shi);
  second = tw_pack2(x2lo * c.x + x1lo * slo, x2hi * c.y + x1hi * shi);
}

extern "C" __global__ void __launch_bounds__(256)
rope_fwd(const tw_u32* __restrict__ QKV, const float* __restrict__ COS, const float* __restrict__ SIN,
         tw_u32* __restrict__ Q, tw_u32* __restrict__ K, tw_u32* __restrict__ V, int B, int S, int H, int HD) {
  const unsigned r = blockIdx.x * blockDim.y + threadIdx.y;
  const int p = threadIdx.x, P = HD / 4;
  if (r >= (unsigned)B * S * 3 * H) return;
  const rp_row w = rp_unflatten(r, S, H);
  const tw_u32* src = QKV + (size_t)r * (HD / 2);
  tw_u32 first = src[p], second = src[P + p];
  if (w.which < 2) rp_rotate(first, second, COS, SIN, w.s, HD, p, 1.f);
  tw_u32* dst = (w.which == 0 ? Q : w.which == 1 ? K : V) + (((size_t)w.b * S + w.s) * H + w.h) * (HD / 2);
  dst[p] = first;
  dst[P + p] = second;
}

// dQ, dK, dV strides over (b, h, s) in elements (even, so that pairs stay 4-byte aligned).
extern "C" __global__ void __launch_bounds__(256)
rope_bwd(const tw_u32* __restrict__ DQ, long long qb, long long qh, long long qs,
         const tw_u32* __restrict__ DK, long long kb, long long kh, long long ks,
         const tw_u32* __restrict__ DV, long long vb, long long vh, long long vs,
         const float* __restrict__ COS, const float* __restrict__ SIN, tw_u32* __restrict__ DQKV,
         int B, int S, int H, int HD) {
  const unsigned r = blockIdx.x * blockDim.y + threadIdx.y;
  const int p = threadIdx.x, P = HD / 4;
  if (r >= (unsigned)B * S * 3 * H) return;
  const rp_row w = rp_unflatten(r, S, H);
  const long long offset = w.which == 0 ? w.b * qb + w.h * qh + w.s * qs
                         : w.which == 1 ? w.b * kb + w.h * kh + w.s * ks
                                        : w.b * vb + w.h * vh + w.s * vs;
  const tw_u32* src = (w.which == 0 ? DQ : w.which == 1 ? DK : DV) + offset / 2;
  tw_u32 first = src[p], second = src[P + p];
  if (w.which < 2) rp_rotate(first, second, COS, SIN, w.s, HD, p, -1.f);
  tw_u32* dst = DQKV + (size_t)r * (HD / 2);
  dst[p] = first;
  dst[P + p] = second;
}
