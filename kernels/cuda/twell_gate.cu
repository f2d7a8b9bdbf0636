// TwELL gate stage on Hopper (sm_90a): G = X Wg^T on the tensor cores, with ReLU and the TwELL pack
// done on the accumulators, so the dense gate matrix does not go through device memory.
//
// For every row r < n_rows and tile k of 256 columns (one CTA tile is 128 rows x one TwELL tile) it
// writes exactly what twell_pack.cu writes from the rounded G (same counts, slots, statistics and
// row totals). The dense gate row segment is written only for overflowing tiles, the only place the
// fused stage reads it (TG_WRITE_ALL 1 writes every tile: the tests compare against it).
//
// Persistent grid, one CTA per SM, clusters of TG_CLUSTER CTAs that share each Wg tile, three warpgroups:
//  - warpgroup 0: one thread streams 128 x 64 tiles of X and 256 x 64 tiles of Wg into a ring of
//    TG_STAGES shared-memory stages with the bulk tensor copy engine (TMA, 128-byte swizzle); each
//    stage's `full` mbarrier completes when its bytes have landed. The CTAs of a cluster work on
//    vertically adjacent tiles with the same Wg tile: each loads 1 / TG_CLUSTER of it and multicasts
//    that slice to all of them, which cuts the L2 -> SM traffic (at 48 KB a k-step per CTA the
//    unclustered kernel moved ~7 TB/s, the L2's limit) by a third for pairs;
//  - warpgroups 1 and 2: each owns 64 rows of the tile, runs wgmma m64n256k16 from shared memory
//    into float32 accumulators (128 registers a thread), frees each stage through its `empty`
//    mbarrier (in every CTA of the cluster: a stage is refilled by all of them), then packs its
//    rows from the registers (through a 4 KB shared-memory scratch per warp, so that only active
//    elements are visited) while the copy engine already fills the ring for the next tile.
// Accumulator layout (wgmma m64nNk16, f32): thread l of warp w holds rows 16 w + l / 4 (+ 8) and
// columns 8 i + 2 (l % 4) (+ 1), i = 0..31: registers 4 i + {0, 1} (row) and 4 i + {2, 3} (row + 8).
#include "twell_common.cuh"

#ifndef TG_STAGES
#define TG_STAGES 4
#endif
#ifndef TG_WRITE_ALL
#define TG_WRITE_ALL 0
#endif
#ifndef TG_CLUSTER
#define TG_CLUSTER 2
#endif
static_assert(TG_CLUSTER == 1 || TG_CLUSTER == 2 || TG_CLUSTER == 4, "TG_CLUSTER must be 1, 2 or 4");
#define TG_BM 128
#define TG_BN 256
#define TG_BK 64
#define TG_THREADS 384
#define TG_CONSUMER_WARPS 8
static_assert(TW_TILE == TG_BN, "the fused gate kernel packs 256-column tiles (TW_TILE 256)");

#if TW_DTYPE == 0
#define TG_AB "bf16.bf16"
#define TG_ROUNDS_TO_ZERO 0x1p-134f  // half the smallest bf16 subnormal: ties round to even, to 0
#else
#define TG_AB "f16.f16"
#define TG_ROUNDS_TO_ZERO 0x1p-25f  // half the smallest fp16 subnormal
#endif

// The driver's CUtensorMap (cuTensorMapEncodeTiled), passed by value.
struct __align__(64) TgTensorMap {
  unsigned long long v[16];
};

#define TG_A_BYTES (TG_BM * TG_BK * 2)
#define TG_B_BYTES (TG_BN * TG_BK * 2)
#define TG_STAGE_BYTES (TG_A_BYTES + TG_B_BYTES)
#define TG_B_SLICE_ROWS (TG_BN / TG_CLUSTER)  // rows of the Wg tile each CTA of a cluster loads
#define TG_SCRATCH_BYTES (32 * 32 * 4)  // per consumer warp: 32 rounded pairs of each lane
// dynamic shared memory the launcher must give (twell.gate_shared_bytes): 1024 bytes of alignment
// slack, the stages, the consumer warps' scratch, the barriers
#define TG_SMEM_BYTES (1024 + TG_STAGES * TG_STAGE_BYTES + TG_CONSUMER_WARPS * TG_SCRATCH_BYTES + 2 * TG_STAGES * 8)
static_assert(TG_SMEM_BYTES <= 232448, "TG_STAGES: at most 4 stages fit in 227 KB of shared memory");

__device__ __forceinline__ unsigned tg_smem_addr(const void* p) {
  unsigned long long a;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
  return (unsigned)a;
}

__device__ __forceinline__ void tg_bar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void tg_bar_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tg_bar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Arrive on the barrier at the same offset in CTA `rank` of the cluster.
__device__ __forceinline__ void tg_bar_arrive_remote(unsigned bar, unsigned rank) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(bar), "r"(rank) : "memory");
}
// Wait until the phase of the given parity has completed.
__device__ __forceinline__ void tg_bar_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "TG_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra TG_WAIT;\n"
      "}\n" ::"r"(bar), "r"(parity) : "memory");
}

__device__ __forceinline__ unsigned tg_cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ int tg_cluster_id() {
  unsigned r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return (int)r;
}
__device__ __forceinline__ int tg_num_clusters() {
  unsigned r;
  asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
  return (int)r;
}
// Every thread of every CTA of the cluster (barrier init before remote use; no CTA exits while
// another may still arrive on its barriers).
__device__ __forceinline__ void tg_cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

__device__ __forceinline__ void tg_tma_load(unsigned dst, const TgTensorMap* map, unsigned bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
      ::"r"(dst), "l"((unsigned long long)map), "r"(bar), "r"(c0), "r"(c1) : "memory");
}
// The same box written at the same offset into every CTA of the cluster in `mask`, completing on each
// one's barrier at `bar`'s offset.
__device__ __forceinline__ void tg_tma_load_multicast(unsigned dst, const TgTensorMap* map, unsigned bar, int c0,
                                                      int c1, unsigned short mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;"
      ::"r"(dst), "l"((unsigned long long)map), "r"(bar), "r"(c0), "r"(c1), "h"(mask) : "memory");
}

// Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle: rows of 64 16-bit elements,
// 8-row groups 1024 bytes apart (the leading-dimension offset is unused in this mode).
__device__ __forceinline__ unsigned long long tg_desc(unsigned addr) {
  return (unsigned long long)((addr & 0x3FFFFu) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
         (1ull << 62);
}

__device__ __forceinline__ void tg_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void tg_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void tg_wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from touching the accumulators across an asynchronous wgmma boundary.
__device__ __forceinline__ void tg_fence_acc(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (+)= A[64 x 16] B[256 x 16]^T; accumulate == 0 overwrites d.
__device__ __forceinline__ void tg_mma(float (&d)[128], unsigned long long desc_a, unsigned long long desc_b,
                                       int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TG_AB " {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// ReLU + TwELL pack of one accumulator row (half 0: registers 4 i + {0, 1}; half 1: 4 i + {2, 3}) of
// one 256-column tile. The row's 256 values are spread over the 4 threads of a quad, thread q holding
// columns 8 i + 2 q + {0, 1}; ascending slot order interleaves the quad, so each active element's rank
// counts the quad's active elements in earlier column groups and earlier threads of its own group.
// The rounded pairs go to the warp's shared-memory scratch (word i of lane l at 4 (32 i + l): no bank
// conflicts), so the slot loop visits only the thread's active elements with a run-time index (a
// register array indexed at run time would live in local memory).
template <int H>
__device__ __forceinline__ void tg_pack_row(const float (&d)[128], unsigned scratch, long long row, int n_rows,
                                            int ktile, int nt, int d_ff, int lane, tw_u16* __restrict__ gate,
                                            int* __restrict__ counts, tw_u32* __restrict__ slots,
                                            int* __restrict__ stats, int* __restrict__ row_total) {
  const int q = lane & 3;
  const unsigned mine = scratch + 4 * lane;
  unsigned mlo = 0u, mhi = 0u;
#pragma unroll
  for (int i = 0; i < 32; ++i) {  // > 0 after rounding to 16 bits iff > TG_ROUNDS_TO_ZERO (NaN: false)
    mlo |= (d[4 * i + 2 * H] > TG_ROUNDS_TO_ZERO ? 1u : 0u) << i;
    mhi |= (d[4 * i + 2 * H + 1] > TG_ROUNDS_TO_ZERO ? 1u : 0u) << i;
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(mine + 128 * i), "r"(tw_pack2(d[4 * i + 2 * H], d[4 * i + 2 * H + 1]))
                 : "memory");
  }
  unsigned ql[4], qh[4];
  int total = 0;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    ql[p] = __shfl_sync(TW_FULL_MASK, mlo, (lane & ~3) | p);
    qh[p] = __shfl_sync(TW_FULL_MASK, mhi, (lane & ~3) | p);
    total += __popc(ql[p]) + __popc(qh[p]);
  }
  if (row >= n_rows) return;
  const long long task = row * nt + ktile;
  tw_u32* sp = slots + task * TW_SLOTS;
  for (unsigned bits = mlo | mhi; bits != 0u; bits &= bits - 1u) {
    const int i = __ffs(bits) - 1;
    const unsigned below = (1u << i) - 1u;
    int rank = 0;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      rank += __popc(ql[p] & below) + __popc(qh[p] & below);
      if (p < q) rank += (int)((ql[p] >> i) & 1u) + (int)((qh[p] >> i) & 1u);
    }
    tw_u32 w;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(w) : "r"(mine + 128 * i) : "memory");
    const tw_u32 col = (tw_u32)(8 * i + 2 * q);
    if ((mlo >> i) & 1u) {
      if (rank < TW_SLOTS) sp[rank] = (w << 16) | col;
      ++rank;
    }
    if (((mhi >> i) & 1u) && rank < TW_SLOTS) sp[rank] = (w & 0xFFFF0000u) | (col + 1u);
  }
  if (TG_WRITE_ALL || total > TW_SLOTS) {  // the dense backup of an overflowing tile (exact fallback)
    tw_u16* grow = gate + row * d_ff + (long long)ktile * TG_BN;
    for (int i = 0; i < 32; ++i) {
      const int col = 8 * i + 2 * q;
      tw_u32 w;
      asm volatile("ld.shared.b32 %0, [%1];" : "=r"(w) : "r"(mine + 128 * i) : "memory");
      if (ktile * TG_BN + col < d_ff) *reinterpret_cast<tw_u32*>(grow + col) = w;
    }
  }
  if (q == 0) {
    counts[task] = total;
    if (row_total != nullptr && total > 0) atomicAdd(row_total + row, total);
    if (total > TW_SLOTS) {
      atomicAdd(stats, 1);
      atomicAdd(stats + 1, total);
    }
  }
}

// A consumed stage goes back to the producers of every CTA of the cluster (all of them refill it).
__device__ __forceinline__ void tg_release(unsigned empty_bar) {
#if TG_CLUSTER > 1
#pragma unroll
  for (unsigned r = 0; r < TG_CLUSTER; ++r) tg_bar_arrive_remote(empty_bar, r);
#else
  tg_bar_arrive(empty_bar);
#endif
}

extern "C" __global__ void __launch_bounds__(TG_THREADS, 1) __cluster_dims__(TG_CLUSTER, 1, 1)
twell_gate_pack(const __grid_constant__ TgTensorMap map_x,  // X [n_rows, d_model], box 64 x 128
                const __grid_constant__ TgTensorMap map_w,  // Wg [d_ff, d_model], box 64 x TG_B_SLICE_ROWS
                tw_u16* __restrict__ gate,                  // [n_rows, d_ff]: overflowing tiles only
                int* __restrict__ counts,                   // [n_rows, nt]
                tw_u32* __restrict__ slots,                 // [n_rows, nt, TW_SLOTS]
                int* __restrict__ stats,                    // [2], accumulated
                int* __restrict__ row_total,                // [n_rows] zeroed by the caller, or null
                int n_rows, int d_ff, int d_model) {
  extern __shared__ unsigned char tg_raw[];
  const unsigned base = (tg_smem_addr(tg_raw) + 1023u) & ~1023u;  // swizzled tiles need 1024-byte alignment
  const unsigned scratch = base + TG_STAGES * TG_STAGE_BYTES;      // the consumer warps' epilogue scratch
  const unsigned bars = scratch + TG_CONSUMER_WARPS * TG_SCRATCH_BYTES;  // full[s], then empty[s]
  const int nt = (d_ff + TG_BN - 1) / TG_BN;
  // a cluster's tile: TG_CLUSTER x 128 rows (CTA `rank` takes the rank-th 128) by 256 columns
  const int n_tiles = ((n_rows + TG_BM * TG_CLUSTER - 1) / (TG_BM * TG_CLUSTER)) * nt;
  const int kblocks = d_model / TG_BK;
  const int wg = threadIdx.x / 128;
  const unsigned rank = TG_CLUSTER > 1 ? tg_cluster_rank() : 0u;
  const int first_tile = TG_CLUSTER > 1 ? tg_cluster_id() : (int)blockIdx.x;
  const int tile_step = TG_CLUSTER > 1 ? tg_num_clusters() : (int)gridDim.x;

  if (threadIdx.x == 0) {
    for (int s = 0; s < TG_STAGES; ++s) {
      tg_bar_init(bars + 8 * s, 1);
      tg_bar_init(bars + 8 * (TG_STAGES + s), TG_CONSUMER_WARPS * TG_CLUSTER);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (TG_CLUSTER > 1)
    tg_cluster_sync();
  else
    __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x == 0) {
      int it = 0;
      for (int tile = first_tile; tile < n_tiles; tile += tile_step) {
        const int m0 = (tile / nt) * TG_BM * TG_CLUSTER + rank * TG_BM;
        const int n0 = (tile % nt) * TG_BN;
        for (int kb = 0; kb < kblocks; ++kb, ++it) {
          const int s = it % TG_STAGES;
          tg_bar_wait(bars + 8 * (TG_STAGES + s), ((it / TG_STAGES) & 1) ^ 1);
          const unsigned full = bars + 8 * s;
          const unsigned a = base + s * TG_STAGE_BYTES;
          tg_bar_expect_tx(full, TG_STAGE_BYTES);  // X tile + the whole Wg tile, whichever CTA loads it
          tg_tma_load(a, &map_x, full, kb * TG_BK, m0);
#if TG_CLUSTER > 1
          tg_tma_load_multicast(a + TG_A_BYTES + rank * (TG_B_SLICE_ROWS * TG_BK * 2), &map_w, full, kb * TG_BK,
                                n0 + rank * TG_B_SLICE_ROWS, (unsigned short)((1u << TG_CLUSTER) - 1u));
#else
          tg_tma_load(a + TG_A_BYTES, &map_w, full, kb * TG_BK, n0);
#endif
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int t = threadIdx.x - 128;  // 0..255 over both consumer warpgroups
    const int half = t / 128;         // which 64 rows of the tile
    const int warp = (t % 128) / 32;
    const int lane = t % 32;
    int it = 0;
    for (int tile = first_tile; tile < n_tiles; tile += tile_step) {
      const int m0 = (tile / nt) * TG_BM * TG_CLUSTER + rank * TG_BM;
      const int ktile = tile % nt;
      float d[128];
#pragma unroll
      for (int i = 0; i < 128; ++i) d[i] = 0.f;
      for (int kb = 0; kb < kblocks; ++kb, ++it) {
        const int s = it % TG_STAGES;
        tg_bar_wait(bars + 8 * s, (it / TG_STAGES) & 1);
        const unsigned a = base + s * TG_STAGE_BYTES + half * (64 * TG_BK * 2);
        const unsigned b = base + s * TG_STAGE_BYTES + TG_A_BYTES;
        tg_wgmma_fence();
#pragma unroll
        for (int k = 0; k < TG_BK / 16; ++k)  // 16 elements = 32 bytes along the swizzled row
          tg_mma(d, tg_desc(a + 32 * k), tg_desc(b + 32 * k), (kb > 0 || k > 0) ? 1 : 0);
        tg_wgmma_commit();
        if (kb > 0) {  // the previous stage's products are done: give it back to the copy engine
          tg_wgmma_wait<1>();
          if (lane == 0) tg_release(bars + 8 * (TG_STAGES + (it - 1) % TG_STAGES));
        }
      }
      tg_wgmma_wait<0>();
      tg_fence_acc(d);
      if (lane == 0) tg_release(bars + 8 * (TG_STAGES + (it - 1) % TG_STAGES));
      const long long row = (long long)m0 + half * 64 + warp * 16 + lane / 4;
      const unsigned mine = scratch + (half * 4 + warp) * TG_SCRATCH_BYTES;
      tg_pack_row<0>(d, mine, row, n_rows, ktile, nt, d_ff, lane, gate, counts, slots, stats, row_total);
      tg_pack_row<1>(d, mine, row + 8, n_rows, ktile, nt, d_ff, lane, gate, counts, slots, stats, row_total);
    }
  }
  if (TG_CLUSTER > 1) tg_cluster_sync();
}
