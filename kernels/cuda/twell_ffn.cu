// Fused sparse up-projection, gating and down-projection over a token's active neurons.
//
//   y[t] = sum over active j of h[t, j] * WdT[j]        (WdT = w_down^T, [d_ff, d_model], rows contiguous)
//   h[t, j] = g[t, j] * (x[t] . Wu[j])                   (TW_GATED 1; g = ReLU(gate) > 0)
//   h[t, j] = g[t, j]                                    (TW_GATED 0: the non-gated FFN, g = ReLU(x Wu^T))
//
// Active list of a token: TwELL (counts + slots from twell_pack.cu) for tiles with count <= S, and a
// scan of the dense gate row for tiles that overflow (exact; nothing dropped). TW_SCAN 1 ignores the
// packed form and scans the whole dense row (a comparison variant). TW_HSLOTS 1 (gated only): the
// slots already hold h instead of g (twell_up.cu computed u for them, token-blocked), so only the
// pairs of overflowing tiles take the up-projection here.
//
// A team of TW_TEAM warps handles one token; warp w of the team owns the slice
// [w * DS, (w + 1) * DS) of d_model (DS = d_model / TEAM): its part of x in registers (packed 16-bit),
// its part of y in float32 registers. Each warp builds the same active list in its own shared-memory
// buffer (entries (bits(g) << 16) | j), then walks it TW_GROUP pairs at a time: partial dot products
// with its slice of the Wu rows, a warp reduction (and, for TEAM > 1, a sum of the team's partials
// through shared memory behind a named barrier), then the scaled accumulate of its slice of the
// WdT rows. Loads are 16 bytes per lane, coalesced across the warp.
//
// Persistent grid: each team takes its next work item from a global counter (atomicAdd), so a heavy
// token (hundreds of active units) never holds up other tokens' slots; with `order` (tokens sorted
// by active count, heaviest first) the heavy tokens start first and the tail stays short.
// Long rows: in trained models the first positions of a sequence activate 1000-2000 units where the
// mean is ~30, and one team walking such a row alone outlasts the whole rest of the kernel. So the
// first R x TW_PARTS items are parts of the `split_count` (<= R) longest rows (the first ones in
// `order`): part p walks the row's tiles tb + p, tb + p + TW_PARTS, ... and writes its float32
// partial row to part_y; twell_rows_finish then adds each split row's parts in part order (the result
// does not depend on timing). Items past R x TW_PARTS are whole tokens, order[split_count] onward.
// Neuron passes: only tiles
// [tile_begin, tile_end) are walked; flags bit 0 starts from the float32 partial sums in y_acc
// instead of zero, bit 1 writes the sums to y_acc instead of the rounded y, bit 2 starts from the
// rounded y of the previous pass (so a large FFN can run in passes whose weight rows fit in L2).
#include "twell_common.cuh"

#ifndef TW_DMODEL
#define TW_DMODEL 2048
#endif
#ifndef TW_GATED
#define TW_GATED 1
#endif
#ifndef TW_TEAM
#define TW_TEAM 1
#endif
#ifndef TW_BLOCK
#define TW_BLOCK 128
#endif
#ifndef TW_MINB
#define TW_MINB 1
#endif
#ifndef TW_GROUP
#define TW_GROUP 2
#endif
#ifndef TW_SCAN
#define TW_SCAN 0
#endif
#ifndef TW_SCAN_BATCH
#define TW_SCAN_BATCH 4
#endif
#ifndef TW_PREFETCH
#define TW_PREFETCH 1  // issue the Wd^T row loads together with the Wu row loads
#endif
#ifndef TW_HSLOTS
#define TW_HSLOTS 0
#endif
#ifndef TW_PARTS
#define TW_PARTS 8  // parts of a split long row
#endif

namespace twf {
constexpr int DM = TW_DMODEL;
constexpr int TEAM = TW_TEAM;
constexpr int DS = DM / TEAM;        // d_model slice of one warp
constexpr int NVS = DS / 8;          // 16-byte vectors in the slice
constexpr int VPL = (NVS + 31) / 32; // vectors per lane
constexpr bool FULLV = (NVS % 32) == 0;
constexpr int WARPS = TW_BLOCK / 32;
constexpr int TEAMS = WARPS / TEAM;  // tokens per block
constexpr int S = TW_SLOTS;
constexpr int T = TW_TILE;
constexpr int LCAP = (32 * S > 256) ? 32 * S : 256;  // list capacity: 32 full tiles, or one dense chunk
constexpr int G = TW_GROUP;
constexpr int SB = TW_SCAN_BATCH;
static_assert(DM % (8 * TEAM) == 0, "d_model / TW_TEAM must be a multiple of 8");
static_assert(TW_BLOCK % 32 == 0 && WARPS % TEAM == 0, "TW_BLOCK must hold whole teams");
static_assert(TEAM == 1 || TEAMS <= 15, "at most 15 named barriers per block");
static_assert(WARPS * LCAP * 4 + TEAMS * 2 * G * TEAM * 4 <= 48 * 1024, "static shared memory over 48 KB");
static_assert(G >= 1 && G <= 8, "TW_GROUP in [1, 8]");
static_assert(!TW_HSLOTS || (TW_GATED && !TW_SCAN), "TW_HSLOTS needs the gated FFN and the packed form");
static_assert(TW_PARTS >= 1 && TW_PARTS <= 64, "TW_PARTS in [1, 64]");
constexpr bool SLOT_UP = TW_GATED && !TW_HSLOTS;  // slot entries carry g (take the up-projection)
}  // namespace twf

__device__ __forceinline__ void tw_named_barrier(int id, int nthreads) {
  asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(nthreads) : "memory");
}

// sum over 8 elements of x * w, as a small tree (float32).
__device__ __forceinline__ float tw_dot8(const uint4& x, const uint4& w) {
  float a = tw_lo(x.x) * tw_lo(w.x);
  float b = tw_hi(x.x) * tw_hi(w.x);
  a = fmaf(tw_lo(x.y), tw_lo(w.y), a);
  b = fmaf(tw_hi(x.y), tw_hi(w.y), b);
  a = fmaf(tw_lo(x.z), tw_lo(w.z), a);
  b = fmaf(tw_hi(x.z), tw_hi(w.z), b);
  a = fmaf(tw_lo(x.w), tw_lo(w.w), a);
  b = fmaf(tw_hi(x.w), tw_hi(w.w), b);
  return a + b;
}

__device__ __forceinline__ void tw_axpy8(float (&acc)[8], float h, const uint4& w) {
  acc[0] = fmaf(h, tw_lo(w.x), acc[0]);
  acc[1] = fmaf(h, tw_hi(w.x), acc[1]);
  acc[2] = fmaf(h, tw_lo(w.y), acc[2]);
  acc[3] = fmaf(h, tw_hi(w.y), acc[3]);
  acc[4] = fmaf(h, tw_lo(w.z), acc[4]);
  acc[5] = fmaf(h, tw_hi(w.z), acc[5]);
  acc[6] = fmaf(h, tw_lo(w.w), acc[6]);
  acc[7] = fmaf(h, tw_hi(w.w), acc[7]);
}

// Walk list[0, len): accumulate h_j * WdT[j] (slice) into acc, where h_j = g_j * (x . Wu[j]) with UP
// and the entry's value without. Warp-uniform; every warp of a team calls it with the same list
// (same len), so named barriers match.
template <bool UP>
__device__ __forceinline__ void tw_process(const tw_u32* list, int len, const uint4 (&xr)[twf::VPL],
                                           float (&acc)[twf::VPL][8], const tw_u16* __restrict__ w_up,
                                           const tw_u16* __restrict__ w_dt, int lane, int wt,
                                           float* part, int& buf, int bar_id, tw_u64 pol) {
  using namespace twf;
  __syncwarp();
  for (int p = 0; p < len; p += G) {
    tw_u32 ent[G];
    float h[G];
#pragma unroll
    for (int b = 0; b < G; ++b) ent[b] = (p + b < len) ? list[p + b] : 0u;
    uint4 wd[G][VPL];
    if constexpr (UP && TW_PREFETCH) {
#pragma unroll
    for (int b = 0; b < G; ++b) {
      const uint4* wr = reinterpret_cast<const uint4*>(w_dt + (unsigned long long)(ent[b] & 0xFFFFu) * DM + wt * DS);
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int v = lane + 32 * i;
        wd[b][i] = ((FULLV || v < NVS) && (b == 0 || p + b < len)) ? tw_ld16(wr + v, pol) : make_uint4(0u, 0u, 0u, 0u);
      }
    }
    }
    if constexpr (UP) {
    float d[G];
#pragma unroll
    for (int b = 0; b < G; ++b) {
      d[b] = 0.f;
      if (b == 0 || p + b < len) {
        const uint4* wr = reinterpret_cast<const uint4*>(w_up + (unsigned long long)(ent[b] & 0xFFFFu) * DM + wt * DS);
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
          const int v = lane + 32 * i;
          if (FULLV || v < NVS) d[b] += tw_dot8(xr[i], tw_ld16(wr + v, pol));
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
      for (int b = 0; b < G; ++b) d[b] += __shfl_xor_sync(TW_FULL_MASK, d[b], o);
    }
    if constexpr (TEAM > 1) {
      if (lane == 0) {
#pragma unroll
        for (int b = 0; b < G; ++b) part[(buf * G + b) * TEAM + wt] = d[b];
      }
      tw_named_barrier(bar_id, TEAM * 32);
#pragma unroll
      for (int b = 0; b < G; ++b) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < TEAM; ++w) s += part[(buf * G + b) * TEAM + w];
        d[b] = s;
      }
      buf ^= 1;
    }
#pragma unroll
    for (int b = 0; b < G; ++b) h[b] = tw_to_float(ent[b] >> 16) * d[b];
    } else {
#pragma unroll
    for (int b = 0; b < G; ++b) h[b] = tw_to_float(ent[b] >> 16);
    }
    if constexpr (UP && TW_PREFETCH) {
#pragma unroll
    for (int b = 0; b < G; ++b) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) tw_axpy8(acc[i], h[b], wd[b][i]);  // h = 0 and zeros past len
    }
    } else {
#pragma unroll
    for (int b = 0; b < G; ++b) {
      if (b == 0 || p + b < len) {
        const uint4* wr = reinterpret_cast<const uint4*>(w_dt + (unsigned long long)(ent[b] & 0xFFFFu) * DM + wt * DS);
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
          const int v = lane + 32 * i;
          if (FULLV || v < NVS) tw_axpy8(acc[i], h[b], tw_ld16(wr + v, pol));
        }
      }
    }
    }
  }
  __syncwarp();
}

extern "C" __global__ void __launch_bounds__(TW_BLOCK, TW_MINB)
twell_ffn_fused(const tw_u16* __restrict__ x,       // [n_tokens, d_model]
                const tw_u16* __restrict__ gate,    // [n_tokens, d_ff] dense gate (pre-ReLU) backup
                const int* __restrict__ counts,     // [n_tokens, nt]
                const tw_u32* __restrict__ slots,   // [n_tokens, nt, S]
                const tw_u16* __restrict__ w_up,    // [d_ff, d_model] (unused when TW_GATED 0)
                const tw_u16* __restrict__ w_dt,    // [d_ff, d_model] = w_down^T
                tw_u16* __restrict__ y,             // [n_tokens, d_model]
                float* __restrict__ y_acc,          // [n_tokens, d_model] float32 partial sums (passes)
                int* __restrict__ work,             // work item counter, zero at launch
                const int* __restrict__ order,      // optional [n_tokens] permutation: token order
                const int* __restrict__ split_count,  // rows of `order` to split (device scalar; R = 0: none)
                float* __restrict__ part_y,         // [R, TW_PARTS, d_model] float32 partial rows
                int R, int n_tokens, int d_ff, int tile_begin, int tile_end, int flags) {
  using namespace twf;
  __shared__ tw_u32 s_list[WARPS][LCAP];
  __shared__ float s_part[TEAMS][2 * G * TEAM];
  __shared__ int s_tok[TEAMS][2][2];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int team = warp / TEAM, wt = warp - team * TEAM;
  const bool leader = (wt == 0) && (lane == 0);
  const int nt = (d_ff + T - 1) / T;
  const int tb = tile_begin, te = tile_end < nt ? tile_end : nt;
  const tw_u64 pol_keep = tw_policy_keep();
  const tw_u64 pol_stream = tw_policy_stream();
  tw_u32* list = s_list[warp];
  float* part = s_part[team];
  const int bar_id = 1 + team;
  int buf = 0, parity = 0;
  int next = 0;
  if (leader) next = atomicAdd(work, 1);

  while (true) {
    // the leader turns the item into (token, slot): slot >= 0 a part of a split row (its part_y
    // slot), token >= n_tokens the end; it skips the part items of rows past split_count itself
    int tok = 0, slot = -1;
    if (leader) {
      const int split_n = R > 0 ? min(min(__ldg(split_count), R), n_tokens) : 0;
      while (next < R * TW_PARTS && next / TW_PARTS >= split_n) next = atomicAdd(work, 1);
      if (next < R * TW_PARTS) {
        tok = order[next / TW_PARTS];
        slot = next;
      } else {
        const int idx = split_n + (next - R * TW_PARTS);
        tok = idx >= n_tokens ? n_tokens : (order != nullptr ? order[idx] : idx);
      }
    }
    long long t;
    if constexpr (TEAM > 1) {
      if (leader) {
        s_tok[team][parity][0] = tok;
        s_tok[team][parity][1] = slot;
      }
      tw_named_barrier(bar_id, TEAM * 32);
      t = s_tok[team][parity][0];
      slot = s_tok[team][parity][1];
      parity ^= 1;
    } else {
      t = __shfl_sync(TW_FULL_MASK, tok, 0);
      slot = __shfl_sync(TW_FULL_MASK, slot, 0);
    }
    if (t >= n_tokens) break;  // the whole team leaves together
    if (leader) next = atomicAdd(work, 1);  // in flight while this token is processed
    const bool carry = slot < 0 || slot % TW_PARTS == 0;  // a split row's part 0 carries earlier passes' sums

    uint4 xr[VPL];
    float acc[VPL][8];
    {
      const uint4* xv = reinterpret_cast<const uint4*>(x + t * DM + wt * DS);
      const float4* av = reinterpret_cast<const float4*>(y_acc + t * DM + wt * DS);
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int v = lane + 32 * i;
        xr[i] = (FULLV || v < NVS) ? tw_ld16(xv + v, pol_stream) : make_uint4(0u, 0u, 0u, 0u);
        if ((flags & 4) && carry && (FULLV || v < NVS)) {
          const uint4 p = tw_ld16(reinterpret_cast<const uint4*>(y + t * DM + wt * DS) + v, pol_stream);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            acc[i][2 * q] = tw_lo(tw_word(p, q));
            acc[i][2 * q + 1] = tw_hi(tw_word(p, q));
          }
        } else if ((flags & 1) && carry && (FULLV || v < NVS)) {
          const float4 a = av[2 * v], b = av[2 * v + 1];
          acc[i][0] = a.x; acc[i][1] = a.y; acc[i][2] = a.z; acc[i][3] = a.w;
          acc[i][4] = b.x; acc[i][5] = b.y; acc[i][6] = b.z; acc[i][7] = b.w;
        } else {
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[i][q] = 0.f;
        }
      }
    }

    int len = 0;
    const tw_u16* grow = gate + t * d_ff;

    // Append the active columns of grow[cb, ce) (ce - cb a multiple of 8) to the list, flushing as needed.
    auto scan_dense = [&](int cb, int ce) {
      for (int c0 = cb; c0 < ce; c0 += 256 * SB) {
        uint4 gv[SB];
#pragma unroll
        for (int q = 0; q < SB; ++q) {
          const int col = c0 + 256 * q + lane * 8;
          gv[q] = (col < ce) ? tw_ld16(grow + col, pol_stream) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int q = 0; q < SB; ++q) {
          if (c0 + 256 * q >= ce) break;  // warp-uniform
          const unsigned m = tw_positive_mask8(gv[q]);
          const int cnt = __popc(m);
          const int incl = tw_warp_scan(cnt, lane);
          const int tot = __shfl_sync(TW_FULL_MASK, incl, 31);
          if (len + tot > LCAP) {
            tw_process<TW_GATED>(list, len, xr, acc, w_up, w_dt, lane, wt, part, buf, bar_id, pol_keep);
            len = 0;
          }
          int o = len + incl - cnt;
          const int col = c0 + 256 * q + lane * 8;
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (m & (1u << e)) list[o++] = (tw_elem_bits(gv[q], e) << 16) | (tw_u32)(col + e);
          len += tot;
        }
      }
    };

#if TW_SCAN
    scan_dense(tb * T, te * T < d_ff ? te * T : d_ff);
#else
    for (int k0 = tb; k0 < te; k0 += 32) {
      const int k = k0 + lane;
      const bool mine = slot < 0 || (k - tb) % TW_PARTS == slot % TW_PARTS;
      const int c = (k < te && mine) ? counts[t * nt + k] : 0;
      const bool ovf = c > S;
      const int cn = ovf ? 0 : c;
      const int incl = tw_warp_scan(cn, lane);
      const int tot = __shfl_sync(TW_FULL_MASK, incl, 31);
      if (len + tot > LCAP) {
        tw_process<SLOT_UP>(list, len, xr, acc, w_up, w_dt, lane, wt, part, buf, bar_id, pol_keep);
        len = 0;
      }
      const int off = len + incl - cn;
      const tw_u32* sp = slots + ((unsigned long long)t * nt + k) * S;
      for (int i0 = 0; i0 < cn; i0 += 4) {
        tw_u32 sv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) sv[q] = (i0 + q < cn) ? sp[i0 + q] : 0u;
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if (i0 + q < cn) list[off + i0 + q] = (sv[q] & 0xFFFF0000u) | (tw_u32)(k * T + (sv[q] & 0xFFFFu));
      }
      len += tot;
      unsigned om = __ballot_sync(TW_FULL_MASK, ovf);
      __syncwarp();
      const bool any_ovf = om != 0u;
      if constexpr (TW_HSLOTS) {  // the list's h entries first: the dense row's entries carry g
        if (any_ovf && len > 0) {
          tw_process<false>(list, len, xr, acc, w_up, w_dt, lane, wt, part, buf, bar_id, pol_keep);
          len = 0;
        }
      }
      while (om) {  // overflowing tiles: exact, from the dense row
        const int kk = k0 + __ffs(om) - 1;
        om &= om - 1;
        const int ce = (kk + 1) * T < d_ff ? (kk + 1) * T : d_ff;
        scan_dense(kk * T, ce);
      }
      if constexpr (TW_HSLOTS) {
        if (any_ovf && len > 0) {
          tw_process<true>(list, len, xr, acc, w_up, w_dt, lane, wt, part, buf, bar_id, pol_keep);
          len = 0;
        }
      }
    }
#endif
    if (len > 0) tw_process<(TW_SCAN ? (bool)TW_GATED : SLOT_UP)>(list, len, xr, acc, w_up, w_dt, lane, wt, part, buf, bar_id, pol_keep);
    __syncwarp();  // the list is rewritten by the next token

    if (slot >= 0 || (flags & 2)) {  // float32 sums: a split row's part (twell_rows_finish adds them) or a pass's
      float* row = slot >= 0 ? part_y + (long long)slot * DM : y_acc + t * DM;
      float4* ar = reinterpret_cast<float4*>(row + wt * DS);
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int v = lane + 32 * i;
        if (FULLV || v < NVS) {
          ar[2 * v] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
          ar[2 * v + 1] = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
        }
      }
    } else {
      tw_u16* yr = y + t * DM + wt * DS;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int v = lane + 32 * i;
        if (FULLV || v < NVS) {
          uint4 o;
          o.x = tw_pack2(acc[i][0], acc[i][1]);
          o.y = tw_pack2(acc[i][2], acc[i][3]);
          o.z = tw_pack2(acc[i][4], acc[i][5]);
          o.w = tw_pack2(acc[i][6], acc[i][7]);
          tw_st16(yr + v * 8, o, pol_stream);
        }
      }
    }
  }
}

// twell_rows_finish: CTA per split row i < split_count (8 columns a thread): the sum of its TW_PARTS
// float32 partial rows, in part order, into y[order[i]] (rounded) or, with flags bit 1, y_acc.
extern "C" __global__ void __launch_bounds__(1024)
twell_rows_finish(const float* __restrict__ part_y, const int* __restrict__ order,
                  const int* __restrict__ split_count, tw_u16* __restrict__ y, float* __restrict__ y_acc, int R,
                  int n_tokens, int flags) {
  using namespace twf;
  const int i = blockIdx.x;
  if (i >= min(min(__ldg(split_count), R), n_tokens)) return;
  const long long t = __ldg(order + i);
  for (int c = threadIdx.x * 8; c < DM; c += blockDim.x * 8) {
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int p = 0; p < TW_PARTS; ++p) {
      const float4* q = reinterpret_cast<const float4*>(part_y + ((long long)i * TW_PARTS + p) * DM + c);
      const float4 lo = __ldg(q), hi = __ldg(q + 1);
      v[0] += lo.x; v[1] += lo.y; v[2] += lo.z; v[3] += lo.w;
      v[4] += hi.x; v[5] += hi.y; v[6] += hi.z; v[7] += hi.w;
    }
    if (flags & 2) {
      float4* a = reinterpret_cast<float4*>(y_acc + t * DM + c);
      a[0] = make_float4(v[0], v[1], v[2], v[3]);
      a[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint4 o;
      o.x = tw_pack2(v[0], v[1]);
      o.y = tw_pack2(v[2], v[3]);
      o.z = tw_pack2(v[4], v[5]);
      o.w = tw_pack2(v[6], v[7]);
      *reinterpret_cast<uint4*>(y + t * DM + c) = o;
    }
  }
}
