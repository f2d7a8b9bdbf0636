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
// caller checks). No CUDA headers: compiles with NVRTC (CuPy) and nvcc alike.

#ifndef CE_DTYPE
#define CE_DTYPE 0
#endif
#define CE_THREADS 512
#define CE_WARPS (CE_THREADS / 32)
#define CE_FULL 0xffffffffu

#if CE_DTYPE == 2
#define CE_VEC 4
#else
#define CE_VEC 8
#endif

typedef unsigned int ce_u32;
struct __align__(16) ce_vec {  // 16 bytes of elements (no CUDA headers: not ce_vec)
  ce_u32 x, y, z, w;
};
#define CE_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float ce_half_to_float(ce_u32 bits16) {
#if CE_DTYPE == 0
  return __uint_as_float(bits16 << 16);
#else
  float f;
  const unsigned short h = (unsigned short)bits16;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

__device__ __forceinline__ ce_u32 ce_pack2(float lo, float hi) {
  ce_u32 r;
#if CE_DTYPE == 0
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

__device__ __forceinline__ void ce_unpack(ce_vec v, float (&f)[CE_VEC]) {
#if CE_DTYPE == 2
  f[0] = __uint_as_float(v.x), f[1] = __uint_as_float(v.y), f[2] = __uint_as_float(v.z), f[3] = __uint_as_float(v.w);
#else
  const ce_u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = ce_half_to_float(w[i] & 0xFFFFu);
    f[2 * i + 1] = ce_half_to_float(w[i] >> 16);
  }
#endif
}

__device__ __forceinline__ ce_vec ce_pack(const float (&f)[CE_VEC]) {
#if CE_DTYPE == 2
  return {__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3])};
#else
  return {ce_pack2(f[0], f[1]), ce_pack2(f[2], f[3]), ce_pack2(f[4], f[5]), ce_pack2(f[6], f[7])};
#endif
}

__device__ __forceinline__ float ce_element(const ce_vec* row, long long i) {
#if CE_DTYPE == 2
  return reinterpret_cast<const float*>(row)[i];
#else
  return ce_half_to_float(reinterpret_cast<const unsigned short*>(row)[i]);
#endif
}

// The logits are read twice and not again after the kernel: keep them out of L1, stream them in L2.
__device__ __forceinline__ ce_vec ce_load(const ce_vec* p) {
  ce_vec v;
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

extern "C" __global__ void __launch_bounds__(CE_THREADS)
ce_loss_grad(const ce_vec* __restrict__ LOGITS, const long long* __restrict__ TARGETS, float* __restrict__ ROW_LOSS,
             ce_vec* __restrict__ GRAD, int V, long long IGNORE) {
  __shared__ float part_m[CE_WARPS], part_s[CE_WARPS], lse_shared;
  const long long row = blockIdx.x;
  const int nvec = V / CE_VEC;
  const ce_vec* x = LOGITS + row * nvec;

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
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(CE_FULL, m, offset), s2 = __shfl_xor_sync(CE_FULL, s, offset);
    ce_combine(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part_m[warp] = m, part_s[warp] = s;
  __syncthreads();
  if (warp == 0) {
    m = lane < CE_WARPS ? part_m[lane] : CE_NEG_INF;
    s = lane < CE_WARPS ? part_s[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float m2 = __shfl_xor_sync(CE_FULL, m, offset), s2 = __shfl_xor_sync(CE_FULL, s, offset);
      ce_combine(m, s, m2, s2);
    }
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
  ce_vec* g = GRAD + row * nvec;
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
