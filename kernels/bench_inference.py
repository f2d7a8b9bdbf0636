"""`python -m sparse_llm.kernels.bench inference [--tokens N] [--shapes 2048x5632,...] [--sweep]`

For each FFN shape and sparsity level (DESIGN.md section 11 synthetic inputs): the measured mean / p99 /
max active units per token and the worst 256-wide tile, dense eager PyTorch time, dense torch.compile
time, TwELL time (gate GEMM + pack + fused sparse up/down), both ratios, relative error against
the float32 reference (ours and dense bf16), peak memory, the overflow rate, and the bytes the fused
stage reads per active (token, neuron) pair with the rate that implies; stage times: cuBLAS gate GEMM +
twell_pack, the fused gate GEMM + pack kernel (Hopper; the one twell_ffn uses there), the sparse
stage (the token-blocked up-projection where it runs, and the fused kernel). Then, per shape, the active
fraction at which TwELL stops beating dense (linear fit of TwELL time against mean active count over
the light-tailed levels). Timings: triton.testing.do_bench median (warm-up, L2 flushed before each
repetition), one process, dense and ours measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from sparse_llm.kernels import twell
from sparse_llm.kernels.reference import ffn_reference, ffn_reference_fp32
from sparse_llm.kernels.row_order import longest_first
from sparse_llm.kernels.synthetic import make_synthetic_ffn

DEFAULT_SHAPES = "2048x5632,2048x8192,4096x11008,1024x2816"
# (name, mean active as a fraction of d_ff, tail s of the row scale exp(s N(0,1)))
LEVELS = [
    ("99.5%", 29 / 5632, 0.0),
    ("98.9%", 60 / 5632, 0.0),
    ("98%", 0.02, 0.0),
    ("95%", 0.05, 0.0),
    ("heavy", 29 / 5632, 0.2),
]
_D = twell.FusedConfig()
SWEEP = [  # the first is the default; each later one changes one or two knobs
    _D,
    replace(_D, lpt=0),
    replace(_D, prefetch=0),
    replace(_D, group=2, regs=168),
    replace(_D, slice_width=2048, regs=255),
    replace(_D, grid_fill=0.5),
    replace(_D, pack_unroll=2),
    replace(_D, scan=1),
    replace(_D, up_blocked=1),
    replace(_D, up_blocked=1, up_tokens=128),
]


def _short(cfg) -> str:
    diff = {k: v for k, v in vars(cfg).items() if getattr(_D, k) != v}
    return "default" if not diff else " ".join(f"{k}={v}" for k, v in diff.items())


def _bench(fn, rep_ms: int = 200) -> float:
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    except ImportError:  # CUDA events, median of 20 after 3 warm-ups
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def _rel(y, ref) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def _stages(syn, w_dt, tile, slots, gated=True):
    """Stage times (ms): cuBLAS gate GEMM, twell_pack, the fused gate GEMM + pack kernel (nan where it
    does not run), and the fused sparse stage; plus the pack's statistics."""
    x, wg, wu = syn.x, syn.w_gate, syn.w_up
    gate = torch.matmul(x, wg.t())
    lpt = twell.current_config().lpt
    row_total = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device) if lpt else None
    counts, packed, stats = twell.twell_pack(gate, tile, slots, row_total=row_total)
    order = longest_first(row_total)[0] if lpt else None
    t_gate = _bench(lambda: torch.matmul(x, wg.t()), 100)
    t_pack = _bench(lambda: twell.twell_pack(gate, tile, slots, row_total=row_total), 100)
    t_gate_kernel = float("nan")
    if twell.gate_kernel_supported(x.device, x.dtype, tile, slots):
        t_gate_kernel = _bench(lambda: twell.twell_gate_pack(x, wg, slots, row_total=row_total), 100)
    t_fused = _bench(lambda: twell.twell_sparse_stage(x, gate, counts, packed, wu if gated else None, w_dt, tile,
                                                      order=order, in_place=False), 100)
    return t_gate, t_pack, t_gate_kernel, t_fused, stats


def _fit_crossover(points, t_dense):
    """points: [(mean_active, t_ours)]; returns mean active count where a + b * active == t_dense."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / max(sum((p[0] - mx) ** 2 for p in points), 1e-12)
    a = my - b * mx
    return (t_dense - a) / b if b > 0 else float("inf"), a, b


def run_sweep(tokens, dtype, d_model, d_ff, seed, tile, slots):
    """Time each launch config at the 99.5% level (uniform) and on the heavy-tailed inputs."""
    inputs = []
    for tail in (0.0, 0.2):
        syn = make_synthetic_ffn(tokens, d_model, d_ff, 29 / 5632 * d_ff, tail, dtype, "cuda", seed)
        w_dt = syn.w_down.t().contiguous()
        ref = ffn_reference_fp32(syn.x, syn.w_gate, syn.w_up, syn.w_down)
        inputs.append((syn, w_dt, ref))
    syn, w_dt, _ = inputs[0]
    gate = torch.matmul(syn.x, syn.w_gate.t())
    counts, packed, _ = twell.twell_pack(gate, tile, slots)
    print(f"\n# sweep of launch configs: {d_model}x{d_ff}, {tokens} tokens, 99.5% level (uniform and heavy tail)",
          flush=True)
    print(f"# default = {_D}")
    print(f"{'config':<40} {'fused ms':>9} {'total ms':>9} {'heavy ms':>9} {'rel err':>9}")
    best = None
    results = []
    for cfg in SWEEP:
        twell.set_default_config(cfg)
        try:
            t_fused = _bench(lambda: twell.twell_sparse_stage(syn.x, gate, counts, packed, syn.w_up, w_dt, tile,
                                                              in_place=False), 100)
            totals, err = [], 0.0
            for s_, w_, ref in inputs:
                y = twell.twell_ffn(s_.x, s_.w_gate, s_.w_up, None, w_down_t=w_)
                err = max(err, _rel(y, ref))
                totals.append(_bench(lambda: twell.twell_ffn(s_.x, s_.w_gate, s_.w_up, None, w_down_t=w_), 100))
        except Exception as exc:  # a config that fails to compile or run is reported, not fatal
            print(f"{_short(cfg):<40} FAILED: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        print(f"{_short(cfg):<40} {t_fused:9.3f} {totals[0]:9.3f} {totals[1]:9.3f} {err:9.2e}", flush=True)
        results.append(dict(config=str(cfg), fused_ms=t_fused, total_ms=totals[0], heavy_ms=totals[1], rel_err=err))
        if err < 1e-2 and (best is None or sum(totals) < best[0]):
            best = (sum(totals), cfg)
    twell.set_default_config(None)
    return (best[1] if best else None), results


def run_pass_sweep(tokens, dtype, d_model, d_ff, seed, tile, slots, base):
    """Neuron passes of the fused stage for a shape whose weights exceed L2: time 1..4 passes."""
    syn = make_synthetic_ffn(tokens, d_model, d_ff, 29 / 5632 * d_ff, 0.0, dtype, "cuda", seed)
    w_dt = syn.w_down.t().contiguous()
    gate = torch.matmul(syn.x, syn.w_gate.t())
    counts, packed, _ = twell.twell_pack(gate, tile, slots)
    auto = twell.num_passes(d_model, d_ff, True, syn.x.device, replace(base, passes=0))
    times = {}
    for passes in sorted({1, 2, 3, 4, auto}):
        cfg = replace(base, passes=passes)
        times[passes] = _bench(lambda: twell.twell_sparse_stage(syn.x, gate, counts, packed, syn.w_up, w_dt, tile,
                                                                config=cfg, in_place=False), 100)
    best = min(times, key=times.get)
    print(f"# passes sweep {d_model}x{d_ff} (weights {2 * d_model * d_ff * 2 / 2**20:.0f} MiB), fused ms: "
          + ", ".join(f"{k}: {v:.2f}" for k, v in times.items()) + f"; auto {auto}; using {best}", flush=True)
    return best


def _measure_level(args, compiled, dtype, d_model, d_ff, name, frac, tail) -> tuple[dict, str]:
    """One (shape, sparsity level) row: dense eager / compiled vs TwELL times, errors, peaks, stages."""
    syn = make_synthetic_ffn(args.tokens, d_model, d_ff, frac * d_ff, tail, dtype, "cuda", args.seed)
    summ = syn.active_summary()
    x, wg, wu, wd = syn.x, syn.w_gate, syn.w_up, syn.w_down
    w_dt = wd.t().contiguous()
    eager = lambda: ffn_reference(x, wg, wu, wd)  # noqa: E731
    ours = lambda: twell.twell_ffn(x, wg, wu, None, w_down_t=w_dt, tile=args.tile, slots=args.slots)  # noqa: E731
    y, stats = twell.twell_ffn(x, wg, wu, None, w_down_t=w_dt, tile=args.tile, slots=args.slots, return_stats=True)
    ref = ffn_reference_fp32(x, wg, wu, wd)
    err = _rel(y, ref)
    err_dense = _rel(eager(), ref)
    del ref, y
    t_e = _bench(eager)
    t_o = _bench(ours)
    t_c = float("nan")
    if compiled is not None:
        comp = lambda: compiled(x, wg, wu, wd)  # noqa: E731
        comp()
        t_c = _bench(comp)
    peaks = [_peak_bytes(eager) / 1e9, _peak_bytes(comp) / 1e9 if compiled is not None else float("nan"),
             _peak_bytes(ours) / 1e9]
    stages = (float("nan"),) * 4
    if not args.no_stages:
        stages = _stages(syn, w_dt, args.tile, args.slots)[:4]
    t_cublas, t_pack, t_gate_kernel, t_fused = stages
    nt = -(-d_ff // args.tile)
    st = stats.tolist()
    ovf_pct = 100.0 * st[0] / (args.tokens * nt)
    bpp = twell.bytes_per_active_pair(d_model)
    pairs = summ["mean"] * args.tokens
    rate = pairs * bpp / (t_fused * 1e-3) / 1e12 if t_fused == t_fused else float("nan")
    tflops = 2 * args.tokens * d_model * d_ff / (t_gate_kernel * 1e-3) / 1e12
    row = dict(shape=f"{d_model}x{d_ff}", level=name, tail=tail, tokens=args.tokens,
               **{f"active_{k}": v for k, v in summ.items()},
               eager_ms=t_e, compiled_ms=t_c, ours_ms=t_o, x_eager=t_e / t_o, x_compiled=t_c / t_o,
               rel_err=err, rel_err_dense_bf16=err_dense, peak_gb_eager=peaks[0], peak_gb_compiled=peaks[1],
               peak_gb_ours=peaks[2], overflow_tiles=st[0], overflow_entries=st[1], overflow_tile_pct=ovf_pct,
               bytes_per_pair=bpp, gate_ms=t_cublas, pack_ms=t_pack, gate_kernel_ms=t_gate_kernel,
               gate_kernel_tflops=tflops, fused_ms=t_fused, fused_tb_s=rate,
               config=str(twell.current_config()))
    line = (f"{d_model}x{d_ff:<6} {name:<6} {summ['mean']:6.1f}/{summ['p99']:4.0f}/{summ['max']:5.0f} "
            f"{summ['worst_tile']:4.0f} {t_e:7.2f} {t_c:7.2f} {t_o:7.2f} {t_e / t_o:6.2f} {t_c / t_o:6.2f} "
            f"{err:8.1e} {err_dense:8.1e} {peaks[0]:5.2f}/{peaks[1]:4.2f}/{peaks[2]:4.2f} {ovf_pct:6.3f} "
            f"{bpp:6d} {t_cublas:5.2f}+{t_pack:4.2f}|{t_gate_kernel:5.2f}/{t_fused:5.2f} {rate:5.2f}")
    return row, line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sparse_llm.kernels.bench inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated d_modelxd_ff")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--levels", default=",".join(n for n, _, _ in LEVELS), help="subset of " + ",".join(n for n, _, _ in LEVELS).replace("%", "%%"))
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--sweep", action="store_true", help="time the fused-kernel configs first and use the fastest")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile dense baseline")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage timings")
    p.add_argument("--json", default=None, help="also write every row to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the inference benchmark needs a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    levels = [lv for lv in LEVELS if lv[0] in args.levels.split(",")]
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB; "
          f"torch {torch.__version__}; dtype {args.dtype}; tokens {args.tokens}; tile {args.tile}, slots {args.slots}",
          flush=True)
    report = dict(device=props.name, torch=torch.__version__, dtype=args.dtype, tokens=args.tokens, rows=[],
                  crossover={}, sweep=[], date=time.strftime("%Y-%m-%d"))
    if args.sweep:
        best, results = run_sweep(args.tokens, dtype, *shapes[0], args.seed, args.tile, args.slots)
        torch.cuda.empty_cache()  # the sweep's inputs went with its frame
        report["sweep"] = results
        if best is not None:
            print(f"using {best}", flush=True)
            twell.set_default_config(best)
        report["config"] = str(twell.current_config())
    compiled = None if args.no_compile else torch.compile(ffn_reference, dynamic=False)

    header = (f"{'shape':<11} {'level':<6} {'act mean/p99/max':>17} {'tile':>4} {'eager':>7} {'compil':>7} "
              f"{'ours':>7} {'xeager':>6} {'xcomp':>6} {'err ours':>8} {'err bf16':>8} {'peak GB e/c/o':>15} "
              f"{'ovf%':>6} {'B/pair':>6} {'gemm+pack|gatek/fused':>22} {'TB/s':>5}")
    lines = []
    base_config = twell.current_config()
    for d_model, d_ff in shapes:
        twell.set_default_config(base_config)
        if args.sweep and 2 * d_model * d_ff * 2 > props.L2_cache_size:
            best = run_pass_sweep(args.tokens, dtype, d_model, d_ff, args.seed, args.tile, args.slots, base_config)
            torch.cuda.empty_cache()
            report["sweep"].append(dict(shape=f"{d_model}x{d_ff}", passes=best))
            twell.set_default_config(replace(base_config, passes=best))
        fit_points = []
        dense_times = []
        comp_times = []
        for name, frac, tail in levels:
            row, line = _measure_level(args, compiled, dtype, d_model, d_ff, name, frac, tail)
            torch.cuda.empty_cache()  # the level's inputs went with _measure_level's frame
            report["rows"].append(row)
            lines.append(line)
            if len(report["rows"]) == 1:
                print(header)
            print(line, flush=True)
            if tail == 0.0:
                fit_points.append((row["active_mean"], row["ours_ms"]))
                dense_times.append(row["eager_ms"])
                comp_times.append(row["compiled_ms"])
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
        if len(fit_points) >= 2:
            t_dense = sum(dense_times) / len(dense_times)
            act_e, a, b = _fit_crossover(fit_points, t_dense)
            t_comp = sum(comp_times) / len(comp_times)
            act_c = _fit_crossover(fit_points, t_comp)[0] if t_comp == t_comp else float("nan")
            cross = dict(active_eager=act_e, fraction_eager=act_e / d_ff, active_compiled=act_c,
                         fraction_compiled=act_c / d_ff, fit_ms=[a, b])
            report["crossover"][f"{d_model}x{d_ff}"] = cross
            msg = (f"crossover {d_model}x{d_ff}: TwELL = {a:.2f} ms + {b * 1e3:.1f} us x active/token; beats dense eager "
                   f"below {act_e:.1f} active/token ({100 * act_e / d_ff:.2f}% active, {100 - 100 * act_e / d_ff:.2f}% sparse), "
                   f"torch.compile below {act_c:.1f} ({100 * act_c / d_ff:.2f}% active)")
            print(msg, flush=True)
            lines.append(msg)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    print("\n# summary (ms; ratios = dense time / TwELL time; err = ||y - ref_fp32|| / ||ref_fp32||)")
    print(header)
    for line in lines:
        print(line)
    if report["crossover"]:
        frac = {k: round(v["fraction_eager"], 5) for k, v in report["crossover"].items()}
        print(f"MEASURED_CROSSOVER (eager) = {frac}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
