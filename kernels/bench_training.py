"""`python -m sparse_llm.kernels.bench training [options]`: hybrid-format FFN fwd+bwd against dense
PyTorch (eager and torch.compile), all measured in one run on synthetic inputs (DESIGN section 11).

Per case: measured mean / p99 / max active units per token and worst 256-wide tile, dense eager
fwd+bwd, dense compiled fwd+bwd, ours (fwd+bwd including the L1 term and the statistics), both
ratios, the largest relative gradient error against the float32 reference (norm-wise, over y, l1,
dx, dWg, dWu, dWd), peak memory above the inputs, and the modelled bytes gathered per active pair
with the rate that implies. `--sweep` times extra densities (ours vs dense eager only) and prints
the crossover active fraction used by HybridRouter.

Timings: CUDA events around each call, L2 flushed before each repetition, median of --reps, two ways.
Queued (the ratios' default, as triton's do_bench and the inference bench time): the repetitions are
enqueued back to back and synchronised once, so the host runs ahead as it does inside a training
step and each call's time is the GPU's. Cold (`cold` columns): a synchronisation after every call,
so each call starts on an empty launch queue and also pays the host's head start; an op with much
host work per call (ours: ~1.7 ms of Python and dispatch a fwd+bwd) looks slower this way.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from sparse_llm.kernels import reference
from sparse_llm.kernels.hybrid import hybrid_ffn, resolve_ell_width
from sparse_llm.kernels.synthetic import make_synthetic_ffn


def _flush_buffer():
    return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")


def time_ms(fn, reps: int, flush: torch.Tensor, warmup: int = 3, queued: bool = False) -> float:
    """Median ms of fn() over reps, L2 flushed before each; queued: no synchronisation between reps."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        if not queued:
            end.synchronize()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-30)).item()


def dense_ffn(x, wg, wu, wd):
    return reference.ffn_reference(x, wg, wu, wd)


def run_case(name, s, args, compiled, flush, c_l1):
    x, wg, wu, wd = s.x, s.w_gate, s.w_up, s.w_down
    n, d = x.shape
    f = wu.shape[0]
    summary = s.active_summary()
    leaves = [t.detach().requires_grad_() for t in (x, wg, wu, wd)]
    dy = torch.randn(n, d, device="cuda", dtype=x.dtype)
    dl1 = torch.tensor(c_l1, device="cuda")

    def ours():
        y, l1, _, _ = hybrid_ffn(*leaves, ell_width=args.ell_width)
        return torch.autograd.grad([y, l1], leaves, [dy, dl1])

    def dense():
        y = dense_ffn(*leaves)
        return torch.autograd.grad([y], leaves, [dy])

    def dense_c():
        y = compiled(*leaves)
        return torch.autograd.grad([y], leaves, [dy])

    t_ours = time_ms(ours, args.reps, flush, queued=True)
    t_dense = time_ms(dense, args.reps, flush, queued=True)
    t_comp = time_ms(dense_c, args.reps, flush, queued=True) if compiled is not None else float("nan")
    t_ours_cold = time_ms(ours, args.reps, flush)
    t_dense_cold = time_ms(dense, args.reps, flush)
    mem_ours, mem_dense = peak_mib(ours), peak_mib(dense)

    # errors against the float32 reference (with the same L1 term)
    ref_leaves = [t.detach().float().requires_grad_() for t in (x, wg, wu, wd)]
    h = reference.ffn_hidden(*ref_leaves[:3])
    y_ref = torch.nn.functional.linear(h, ref_leaves[3])
    l1_ref = reference.activation_stats(h)[0]
    g_ref = torch.autograd.grad([y_ref, l1_ref], ref_leaves, [dy.float(), dl1])
    y, l1, _, _ = hybrid_ffn(*leaves, ell_width=args.ell_width)
    g = torch.autograd.grad([y, l1], leaves, [dy, dl1])
    errs = {"y": rel(y, y_ref), "l1": rel(l1, l1_ref)}
    errs.update({k: rel(a, b) for k, a, b in zip(["dx", "dwg", "dwu", "dwd"], g, g_ref)})
    del h, y_ref, g_ref, ref_leaves

    # modelled gather bytes: forward Wu_j + Wd_j rows, dW pass x_t + dy_t, dX pass Wg_j + Wu_j; a pair
    # past the ELL width also reads dy_t, x_t and Wd_j again in the dX pass
    active = (x.float() @ wg.float().t()) > 0
    pairs = active.sum().item()
    rank = torch.cumsum(active.int(), 1) - 1
    width = resolve_ell_width(args.ell_width, f)
    over = (active & (rank >= width)).sum().item()
    row_bytes = 2 * d
    gathered = pairs * 6 * row_bytes + over * 3 * row_bytes
    per_pair = gathered / max(pairs, 1)
    rate = gathered / (t_ours * 1e-3) / 1e12
    del active, rank
    return dict(case=name, tokens=n, d_model=d, d_ff=f, **{f"act_{k}": v for k, v in summary.items()},
                dense_eager_ms=t_dense, dense_compiled_ms=t_comp, ours_ms=t_ours,
                ratio_eager=t_dense / t_ours, ratio_compiled=t_comp / t_ours, dense_eager_cold_ms=t_dense_cold,
                ours_cold_ms=t_ours_cold, ratio_eager_cold=t_dense_cold / t_ours_cold, max_rel_err=max(errs.values()),
                errs=errs, peak_mib_ours=mem_ours, peak_mib_dense=mem_dense, pairs=pairs,
                overflow_pairs=over, kb_per_pair=per_pair / 1024, gather_tb_s=rate)


def _kernel_times(step, warmup: int = 3, repeats: int = 5) -> dict[str, float]:
    """Mean device time (ms) per call of `step` of every CUDA kernel it runs, by name (one profile)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    times = {e.key: (getattr(e, "device_time_total", 0) or 0) / repeats / 1000 for e in prof.key_averages()}
    return {name: ms for name, ms in times.items() if ms > 0}


def _kernel_ms(step, kernel: str, warmup: int = 3, repeats: int = 5) -> float:
    """Mean device time (ms) per call of `step` spent in the CUDA kernel named `kernel`."""
    return _kernel_times(step, warmup, repeats).get(kernel, 0.0)


# The weight-gradient kernels of every design so far (hy_dw until v19; the two passes since v20), so that
# one copy of an experiment times either tree.
DW_KERNELS = ("hy_dw", "hy_fill_au", "hy_dwy", "hy_dwx")


def _main_kernel_ms(step) -> dict[str, float]:
    """hy_forward, dW (the sum of DW_KERNELS, under the key "hy_dw") and hy_dx device ms a call of `step`."""
    times = _kernel_times(step)
    return {"hy_forward": times.get("hy_forward", 0.0), "hy_dw": sum(times.get(k, 0.0) for k in DW_KERNELS),
            "hy_dx": times.get("hy_dx", 0.0)}


def profile_case(s, args, name):
    leaves = [t.detach().requires_grad_() for t in (s.x, s.w_gate, s.w_up, s.w_down)]
    dy = torch.randn_like(s.x)
    dl1 = torch.tensor(0.1, device="cuda")

    def ours():
        y, l1, _, _ = hybrid_ffn(*leaves, ell_width=args.ell_width)
        return torch.autograd.grad([y, l1], leaves, [dy, dl1])

    from sparse_llm.kernels import hybrid

    if args.dw_splits:  # time the dW passes alone for each unit split size
        for split in [int(v) for v in args.dw_splits.split(",")]:
            hybrid.DW_SPLIT_TOKENS = split
            print(f"  dW with DW_SPLIT_TOKENS={split}: {_main_kernel_ms(ours)['hy_dw']:.3f} ms per backward", flush=True)
        hybrid.DW_SPLIT_TOKENS = args.dw_split
    if args.fwd_minb:  # time hy_forward alone for each register cap
        for mb in [int(v) for v in args.fwd_minb.split(",")]:
            hybrid.FWD_MIN_BLOCKS = mb
            print(f"  hy_forward with FWD_MIN_BLOCKS={mb}: {_kernel_ms(ours, 'hy_forward'):.3f} ms", flush=True)
        hybrid.FWD_MIN_BLOCKS = 1
    for _ in range(3):
        ours()
    torch.cuda.synchronize()
    reps = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            ours()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if total > 0:
            rows.append((total / reps / 1000, ev.key[:60], ev.count // reps))
    rows.sort(reverse=True)
    print(f"\nper-kernel device time of ours, case {name} (ms per fwd+bwd):")
    for ms, key, cnt in rows[:14]:
        print(f"  {ms:7.3f}  x{cnt:<2d} {key}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sparse_llm.kernels.bench training")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--d-ff", type=int, default=5632)
    p.add_argument("--sparsities", default="0.995,0.99,0.98")
    p.add_argument("--tail", type=float, default=0.0, help="row-scale spread s of the level cases")
    p.add_argument("--heavy-tail", type=float, default=0.2, help="s of the heavy-tailed 99.5%% case")
    p.add_argument("--ell-width", type=int, default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--l1-grad", type=float, default=0.1, help="dL/dl1_sum used in the backward")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--sweep", default="", help="extra mean-active counts to time (ours vs eager)")
    p.add_argument("--profile", action="store_true", help="per-kernel times of the first case")
    p.add_argument("--json", default="", help="write the rows to this file")
    p.add_argument("--fwd-minb", default="", help="with --profile: hy_forward times for these min-blocks")
    p.add_argument("--dw-splits", default="", help="with --profile: dW pass times for these unit split sizes")
    p.add_argument("--dw-split", type=int, default=256, help="dW passes: tokens per item of a split unit")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the training bench needs a CUDA GPU")
    torch.manual_seed(0)
    from sparse_llm.kernels import hybrid

    hybrid.DW_SPLIT_TOKENS = args.dw_split
    dev = torch.cuda.get_device_name()
    d, f, n = args.d_model, args.d_ff, args.tokens
    compiled = None if args.no_compile else torch.compile(dense_ffn)
    flush = _flush_buffer()
    cases = [(f"{float(sp) * 100:g}%", (1 - float(sp)) * f, args.tail) for sp in args.sparsities.split(",") if sp]
    cases.append((f"{float(args.sparsities.split(',')[0]) * 100:g}% tail{args.heavy_tail:g}",
                  (1 - float(args.sparsities.split(",")[0])) * f, args.heavy_tail))
    rows = []
    for i, (name, mean_active, tail) in enumerate(cases):
        s = make_synthetic_ffn(n, d, f, mean_active, tail=tail, dtype=torch.bfloat16, device="cuda", seed=1 + i)
        if args.profile and (i == 0 or tail > 0):
            profile_case(s, args, name)
        rows.append(run_case(name, s, args, compiled, flush, args.l1_grad))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()
                          if k != "errs"}), flush=True)
        print("   errors:", {k: f"{v:.2e}" for k, v in rows[-1]["errs"].items()}, flush=True)
        del s
    sweep = []
    for m in [float(v) for v in args.sweep.split(",") if v]:
        s = make_synthetic_ffn(n, d, f, m, tail=args.tail, dtype=torch.bfloat16, device="cuda", seed=100)
        r = run_case(f"mean{m:g}", s, argparse.Namespace(**{**vars(args), "reps": max(5, args.reps // 2)}),
                     None, flush, args.l1_grad)
        sweep.append(r)
        print(f"sweep mean_active {r['act_mean']:.1f} ({r['act_mean'] / f:.4f}): ours {r['ours_ms']:.3f} ms, "
              f"dense {r['dense_eager_ms']:.3f} ms, ratio {r['ratio_eager']:.2f}", flush=True)
        del s
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev, "rows": rows, "sweep": sweep}, fh, indent=1)

    print(f"\nhybrid training FFN fwd+bwd, {dev}, bf16, tokens {n}, d_model {d}, d_ff {f}, "
          f"ell_width {resolve_ell_width(args.ell_width, f)}, median of {args.reps}, L2 flushed; "
          "queued, and cold (synchronised after each call)")
    print("| case | act mean/p99/max (tile) | dense eager ms | dense compiled ms | ours ms | vs eager "
          "| vs compiled | cold: dense / ours ms (ratio) | max rel err | peak MiB ours/dense | KB/pair | TB/s |")
    print("| --- " * 12 + "|")
    for r in rows:
        print(f"| {r['case']} | {r['act_mean']:.1f}/{r['act_p99']:.0f}/{r['act_max']:.0f} ({r['act_worst_tile']:.0f}) "
              f"| {r['dense_eager_ms']:.3f} | {r['dense_compiled_ms']:.3f} | {r['ours_ms']:.3f} "
              f"| {r['ratio_eager']:.2f}x | {r['ratio_compiled']:.2f}x "
              f"| {r['dense_eager_cold_ms']:.3f} / {r['ours_cold_ms']:.3f} ({r['ratio_eager_cold']:.2f}x) "
              f"| {r['max_rel_err']:.1e} "
              f"| {r['peak_mib_ours']:.0f}/{r['peak_mib_dense']:.0f} | {r['kb_per_pair']:.1f} "
              f"| {r['gather_tb_s']:.2f} |")
    if sweep:
        pts = sorted((r["act_mean"] / f, r["ratio_eager"]) for r in rows[:1] + sweep)
        cross = None
        for (f0, r0), (f1, r1) in zip(pts, pts[1:]):
            if r0 >= 1.0 > r1:
                cross = f0 + (r0 - 1.0) * (f1 - f0) / (r0 - r1)
                break
        print(f"crossover active fraction (ours = dense eager): {cross if cross is None else round(cross, 4)}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
