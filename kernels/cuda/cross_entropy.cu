// Cross entropy of the LM head's logits with its gradient, in one kernel: per row r of LOGITS
// [rows, V] with target t,
//   ROW_LOSS[r] = logsumexp(x_r) - x_r[t]               (0 where t == IGNORE, NaN where t is not in [0, V))
//   GRAD[r, :]  = softmax(x_r) - onehot(t)              (0 where t == IGNORE; skipped when GRAD is null)
// i.e. the gradient of the summed loss, written in the logits' dtype while the row is at hand, so the
// float32 [rows, V] tensors of the PyTorch formula (a copy, the log-softmax kept for the backward, its
// gradient) never exist; the backward only scales GRAD.
// One CTA per row: pass 1 folds each 16-byte vector into a running (max, sum of exp(x - max)) per
// thread, then across the CTA; pass 2 re-reads the row (from L2: it was just read) and writes GRAD.
// CE_DTYPE 0 = bf16, 1 = fp16, 2 = float32; V % (16 / element size) == 0 and 16-byte aligned rows (the
// caller checks). No CUDA headers: compiles with NVRTC (CuPy) and nvcc alike (16-bit conversions from
// twell_common.cuh).

#ifndef CE_DTYPE
#define CE_DTYPE 0
#endif
#if CE_DTYPE == 1
#define TW_DTYPE 1  // the 16-bit conversions of twell_common.cuh (float32 does not use them)
#endif
#include "twell_common.cuh"

#define CE_THREADS 512
#define CE_WARPS (CE_THREADS / 32)
#if CE_DTYPE == 2
#define CE_VEC 4
#else
#define CE_VEC 8
#endif
#define CE_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ void ce_unpack(uint4 v, float (&f)[CE_VEC]) {
#if CE_DTYPE == 2
  f[0] = __uint_as_float(v.x), f[1] = __uint_as_float(v.y), f[2] = __uint_as_float(v.z), f[3] = __uint_as_float(v.w);
#else
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const tw_u32 w = tw_word(v, i);
    f[2 * i] = tw_lo(w);
    f[2 * i + 1] = tw_hi(w);
  }
#endif
}

__device__ __forceinline__ uint4 ce_pack(const float (&f)[CE_VEC]) {
  uint4 v;
#if CE_DTYPE == 2
  v.x = __float_as_uint(f[0]), v.y = __float_as_uint(f[1]), v.z = __float_as_uint(f[2]), v.w = __float_as_uint(f[3]);
#else
  v.x = tw_pack2(f[0], f[1]), v.y = tw_pack2(f[2], f[3]), v.z = tw_pack2(f[4], f[5]), v.w = tw_pack2(f[6], f[7]);
#endif
  return v;
}

__device__ __forceinline__ float ce_element(const uint4* row, long long i) {
#if CE_DTYPE == 2
  return reinterpret_cast<const float*>(row)[i];
#else
  return tw_to_float(reinterpret_cast<const tw_u16*>(row)[i]);
#endif
}

// The logits are read twice and not again after the kernel: keep them out of L1, stream them in L2.
__device__ __forceinline__ uint4 ce_load(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// (m, s) stands for s * exp(m): the sum of exp over the values seen, relative to their max m.
// -inf maxima (nothing but -inf seen yet) shift by 0, so no -inf - -inf NaN arises.
__device__ __forceinline__ void ce_combine(float& m, float& s, float m2, float s2) {
  const float top = fmaxf(m, m2);
  const float shift = top == CE_NEG_INF ? 0.f : top;
  s = s * __expf(m - shift) + s2 * __expf(m2 - shift);
  m = top;
}

// (m, s) of the whole warp, in every lane.
__device__ __forceinline__ void ce_warp_combine(float& m, float& s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(TW_FULL_MASK, m, offset), s2 = __shfl_xor_sync(TW_FULL_MASK, s, offset);
    ce_combine(m, s, m2, s2);
  }
}

extern "C" __global__ void __launch_bounds__(CE_THREADS)
ce_loss_grad(const uint4* __restrict__ LOGITS, const long long* __restrict__ TARGETS, float* __restrict__ ROW_LOSS,
             uint4* __restrict__ GRAD, int V, long long IGNORE) {
  __shared__ float part_m[CE_WARPS], part_s[CE_WARPS], lse_shared;
  const long long row = blockIdx.x;
  const int nvec = V / CE_VEC;
  const uint4* x = LOGITS + row * nvec;

  float m = CE_NEG_INF, s = 0.f;
  for (int i = threadIdx.x; i < nvec; i += CE_THREADS) {
    float f[CE_VEC];
    ce_unpack(ce_load(x + i), f);
    float top = f[0];
#pragma unroll
    for (int j = 1; j < CE_VEC; ++j) top = fmaxf(top, f[j]);
    const float shift = top == CE_NEG_INF ? 0.f : top;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < CE_VEC; ++j) sum += __expf(f[j] - shift);  // NaN logits make the sum NaN
    ce_combine(m, s, top, sum);
  }
  ce_warp_combine(m, s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part_m[warp] = m, part_s[warp] = s;
  __syncthreads();
  if (warp == 0) {
    m = lane < CE_WARPS ? part_m[lane] : CE_NEG_INF;
    s = lane < CE_WARPS ? part_s[lane] : 0.f;
    ce_warp_combine(m, s);
    if (lane == 0) lse_shared = m + __logf(s);
  }
  __syncthreads();
  const float lse = lse_shared;
  const long long t = TARGETS[row];
  const bool ignored = t == IGNORE;
  const bool in_range = t >= 0 && t < V;
  if (threadIdx.x == 0) {
    float loss = 0.f;
    if (!ignored) {
      if (in_range) {
        loss = lse - ce_element(x, t);
      } else {
        loss = __int_as_float(0x7fc00000);  // NaN: no host sync to raise on a bad target
      }
    }
    ROW_LOSS[row] = loss;
  }
  if (GRAD == nullptr) return;
  uint4* g = GRAD + row * nvec;
  for (int i = threadIdx.x; i < nvec; i += CE_THREADS) {
    float f[CE_VEC];
    ce_unpack(ce_load(x + i), f);
#pragma unroll
    for (int j = 0; j < CE_VEC; ++j) {
      const float p = __expf(f[j] - lse);
      f[j] = ignored ? 0.f : (i * CE_VEC + j == t ? p - 1.f : p);
    }
    g[i] = ce_pack(f);
  }
}
