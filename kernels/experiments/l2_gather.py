"""How fast can SMs gather random 4 KB rows that sit in L2? (the fused TwELL stage and the hybrid
kernels stream one weight row per active pair; NOTES_twell calls 7.5 TB/s "the L2 rate").

Three ways to move the same rows, each summed into a register so the loads are live:
  ld     each lane loads 16 bytes per row (8 per lane for 4 KB), UNROLL rows in flight per warp
         (what twell_ffn / hybrid do);
  bulk   one lane issues cp.async.bulk (the TMA's 1-D copy) of the whole row into a shared-memory ring
         of STAGES rows per warp; the warp then reads it from shared memory;
  bulk0  the same copies, but the warp reads one word of each row (the copy engine's rate alone).
Rows are drawn uniformly from R rows of 4 KB (R = 2816 / 5632 / 11264: 11.5 / 23 / 46 MB).

    PYTHONPATH=$PWD python kernels/experiments/l2_gather.py
"""
import cupy
import torch

SOURCE = r"""
typedef unsigned int u32;
#define ROWV 256  // 16-byte vectors in a 4 KB row

__device__ __forceinline__ uint4 ld16(const uint4* p) {
  uint4 v;
#if NOALLOC
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#endif
  return v;
}

extern "C" __global__ void gather_ld(const uint4* __restrict__ rows, const int* __restrict__ idx, int n,
                                     u32* out) {
  const int lane = threadIdx.x & 31;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5;
  u32 acc = 0;
  for (int r = warp * UNROLL; r < n; r += nw * UNROLL) {
    uint4 v[UNROLL][8];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const uint4* row = rows + (size_t)idx[min(r + u, n - 1)] * ROWV;
#pragma unroll
      for (int i = 0; i < 8; ++i) v[u][i] = ld16(row + lane + 32 * i);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc ^= v[u][i].x + v[u][i].y + v[u][i].z + v[u][i].w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  unsigned long long a;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
  return (u32)a;
}

extern "C" __global__ void gather_bulk(const uint4* __restrict__ rows, const int* __restrict__ idx, int n,
                                       u32* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5;
  const int warps = blockDim.x >> 5;
  const u32 buf = smem_addr(smem + wib * STAGES * 4096);
  const u32 bars = smem_addr(smem + warps * STAGES * 4096) + wib * STAGES * 8;
  if (lane == 0) {
    for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bars + 8 * s));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncwarp();
  auto issue = [&](int k) {
    const int r = warp + k * nw;
    if (r >= n) return;
    const int s = k % STAGES;
    const uint4* src = rows + (size_t)idx[r] * ROWV;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 4096;" ::"r"(bars + 8 * s) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 4096, [%2];"
                 ::"r"(buf + 4096 * s), "l"(src), "r"(bars + 8 * s) : "memory");
  };
  if (lane == 0)
    for (int k = 0; k < STAGES; ++k) issue(k);
  u32 acc = 0;
  for (int k = 0; warp + k * nw < n; ++k) {
    const int s = k % STAGES;
    const u32 parity = (k / STAGES) & 1;
    asm volatile(
        "{\n.reg .pred done;\nW:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra W;\n}\n" ::"r"(bars + 8 * s), "r"(parity) : "memory");
#if CONSUME
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(buf + 4096 * s + 16 * (lane + 32 * i)));
      acc ^= v.x + v.y + v.z + v.w;
    }
#else
    u32 w;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(w) : "r"(buf + 4096 * s + 4 * lane));
    acc ^= w;
#endif
    __syncwarp();
    if (lane == 0) issue(k + STAGES);
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
"""


def module(**defines):
    options = ("-std=c++17", "-arch=sm_90a") + tuple(f"-D{k}={v}" for k, v in defines.items())
    return cupy.RawModule(code=SOURCE, options=options)


def time_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = 2_000_000
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    variants = []
    for u in (1, 2, 4):
        for noalloc in (0, 1):
            fn = module(UNROLL=u, NOALLOC=noalloc, STAGES=1, CONSUME=1).get_function("gather_ld")
            for threads, blocks_per_sm in ((128, 8), (256, 8), (512, 4)):
                variants.append((f"ld unroll={u} noalloc={noalloc} {threads}x{blocks_per_sm}/SM", fn, threads,
                                 blocks_per_sm, 0))
    for consume in (1, 0):
        for stages, warps in ((4, 4), (8, 2), (8, 4), (16, 1), (6, 8)):
            fn = module(UNROLL=1, NOALLOC=0, STAGES=stages, CONSUME=consume).get_function("gather_bulk")
            smem = warps * stages * (4096 + 8)
            fn.max_dynamic_shared_size_bytes = smem
            per_sm = max(1, min(32 // warps, 227 * 1024 // smem))
            variants.append((f"bulk{'' if consume else '0'} stages={stages} warps={warps} ({per_sm}/SM)", fn,
                             32 * warps, per_sm, smem))
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    for rows_count in (2816, 5632, 11264):
        rows = torch.randint(-2**31, 2**31 - 1, (rows_count, 1024), dtype=torch.int32, device="cuda")
        idx = torch.randint(0, rows_count, (n,), dtype=torch.int32, device="cuda")
        print(f"--- {rows_count} rows ({rows_count * 4096 / 2**20:.1f} MiB), {n} gathers of 4 KB", flush=True)
        for name, fn, threads, per_sm, smem in variants:
            def run():
                with stream:
                    fn((sms * per_sm,), (threads,), (rows.data_ptr(), idx.data_ptr(), cupy.int32(n),
                                                     out.data_ptr()), shared_mem=smem)
            ms = time_ms(run)
            print(f"{name:44s} {ms:7.3f} ms  {n * 4096 / ms / 1e9:6.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
