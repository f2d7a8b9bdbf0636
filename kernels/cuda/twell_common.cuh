// Shared helpers of the CUDA kernels: the TwELL format and its inference kernels (twell_pack.cu,
// twell_ffn.cu, twell_gate.cu), and the 16-bit conversions, L2 policies, 16-byte accesses and warp
// scan (and the CTA-wide scan) that hybrid.cu, rope.cu, cross_entropy.cu and twell_up.cu use as well.
//
// No CUDA headers are included on purpose: the kernels compile with NVRTC (CuPy RawModule) and
// with nvcc alike, and bf16 / fp16 conversions are done with bit operations or one PTX `cvt`.
// Element type: TW_DTYPE 0 = bfloat16, 1 = float16; both travel as raw 16-bit patterns.
#pragma once

#ifndef TW_DTYPE
#define TW_DTYPE 0
#endif
// The packed format, shared by its producer (twell_pack) and consumer (twell_ffn): tiles of TW_TILE
// columns, at most TW_SLOTS stored active columns per tile.
#ifndef TW_TILE
#define TW_TILE 256
#endif
#ifndef TW_SLOTS
#define TW_SLOTS 32
#endif
static_assert(TW_TILE % 256 == 0 && TW_TILE <= 65536, "TW_TILE must be a multiple of 256, at most 65536");
static_assert(TW_SLOTS >= 1 && TW_SLOTS <= TW_TILE, "TW_SLOTS must be in [1, TW_TILE]");

typedef unsigned int tw_u32;
typedef unsigned short tw_u16;
typedef unsigned long long tw_u64;

#define TW_FULL_MASK 0xffffffffu

// Largest bit pattern that is a positive (non-NaN) value: +inf. Bits in [1, TW_POS_MAX] are > 0.
#if TW_DTYPE == 0
#define TW_POS_MAX 0x7F80u
#else
#define TW_POS_MAX 0x7C00u
#endif

__device__ __forceinline__ bool tw_positive(tw_u32 bits16) { return bits16 - 1u < TW_POS_MAX; }

// The 16-bit value in the low half of `bits` as float.
__device__ __forceinline__ float tw_to_float(tw_u32 bits) {
#if TW_DTYPE == 0
  return __uint_as_float(bits << 16);
#else
  float f;
  unsigned short h = (unsigned short)(bits & 0xFFFFu);
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

// The element in the low / high half of a packed pair.
__device__ __forceinline__ float tw_lo(tw_u32 v) { return tw_to_float(v); }
__device__ __forceinline__ float tw_hi(tw_u32 v) {
#if TW_DTYPE == 0
  return __uint_as_float(v & 0xFFFF0000u);
#else
  return tw_to_float(v >> 16);
#endif
}

// Two floats rounded to nearest-even into a packed pair (lo in the low half).
__device__ __forceinline__ tw_u32 tw_pack2(float lo, float hi) {
  tw_u32 r;
#if TW_DTYPE == 0
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

__device__ __forceinline__ tw_u32 tw_word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// L2 eviction policies: weights are re-read by every token (keep), activations stream (drop first).
__device__ __forceinline__ tw_u64 tw_policy_keep() {
  tw_u64 p;
  asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ tw_u64 tw_policy_stream() {
  tw_u64 p;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}

// 16-byte read-only load with an L2 cache policy (TW_HINTS 0: a plain read-only load).
__device__ __forceinline__ uint4 tw_ld16(const void* p, tw_u64 policy) {
  uint4 r;
#if defined(TW_HINTS) && TW_HINTS == 0
  (void)policy;
  asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
#else
  asm("ld.global.nc.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "l"(policy));
#endif
  return r;
}

__device__ __forceinline__ void tw_st16(void* p, uint4 v, tw_u64 policy) {
#if defined(TW_HINTS) && TW_HINTS == 0
  (void)policy;
  asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};"
               :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
#else
  asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1,%2,%3,%4}, %5;"
               :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "l"(policy) : "memory");
#endif
}

// Inclusive prefix sum across the warp.
__device__ __forceinline__ int tw_warp_scan(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int n = __shfl_up_sync(TW_FULL_MASK, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// Bit e of the result is set when element e (0..7) of the 8-element vector is > 0.
__device__ __forceinline__ unsigned tw_positive_mask8(const uint4& v) {
  unsigned m = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    tw_u32 w = tw_word(v, e >> 1);
    tw_u32 b = (e & 1) ? (w >> 16) : (w & 0xFFFFu);
    m |= tw_positive(b) ? (1u << e) : 0u;
  }
  return m;
}

__device__ __forceinline__ tw_u32 tw_elem_bits(const uint4& v, int e) {
  tw_u32 w = tw_word(v, e >> 1);
  return (e & 1) ? (w >> 16) : (w & 0xFFFFu);
}

// In-place exclusive scan of a[0, n) (shared or global memory) over a CTA of NT threads; returns the
// total. Each thread sums a contiguous segment; warp_sums holds NT / 32 ints. Every thread calls it.
template <int NT>
__device__ int tw_block_exclusive_scan(int* a, int n, int* warp_sums) {
  static_assert(NT % 32 == 0 && NT >= 32 && NT <= 1024, "whole warps, one CTA");
  constexpr int WARPS = NT / 32;
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
