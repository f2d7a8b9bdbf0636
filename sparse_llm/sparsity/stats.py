"""Per-layer activation statistics, accumulated on device and reduced across ranks at log time.

Every quantity is kept as a sum (token counts, |h| sums, histograms), so the cross-rank reduction is
one all-reduce(SUM) of one flat tensor, and the per-step update never syncs with the host. The
percentiles and maxima come from the histograms. "Dead" means a unit that fired on no token of
any rank since the last summary (the window is the logging interval).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from sparse_llm.kernels.hybrid import DEFAULT_ELL_WIDTH
from sparse_llm.kernels.reference import STATS_TILE
from sparse_llm.kernels.twell_reference import DEFAULT_SLOTS, DEFAULT_TILE
from sparse_llm.model.ffn import FFNStats
from sparse_llm.parallel.distributed import all_reduce_sum

PER_LAYER = ("active_per_token", "active_frac", "l1_per_token", "dead_frac",
             "active_p50", "active_p99", "active_max", "worst_tile")
AGGREGATED = ("active_per_token", "active_frac", "l1_per_token", "dead_frac")


class SparsityStats:
    def __init__(self, n_layers: int, d_ff: int, device: torch.device):
        self.n_layers, self.d_ff = n_layers, d_ff
        kw = dict(device=device, dtype=torch.float64)
        self.tokens = torch.zeros((), **kw)
        self.l1 = torch.zeros(n_layers, **kw)
        self.active_hist = torch.zeros(n_layers, d_ff + 1, **kw)
        self.tile_hist = torch.zeros(n_layers, STATS_TILE + 1, **kw)
        self.neuron_fires = torch.zeros(n_layers, d_ff, **kw)

    @torch.no_grad()
    def update(self, layer_stats: Sequence[Optional[FFNStats]]) -> None:
        if not layer_stats or layer_stats[0] is None:
            return
        self.tokens += layer_stats[0].tile_counts.shape[0]
        for i, stats in enumerate(layer_stats):
            self.l1[i] += stats.l1_sum.detach().double()
            per_token = stats.tile_counts.sum(1, dtype=torch.int64)
            worst_tile = stats.tile_counts.amax(1).long()
            self.active_hist[i].index_add_(0, per_token, torch.ones_like(per_token, dtype=torch.float64))
            self.tile_hist[i].index_add_(0, worst_tile, torch.ones_like(worst_tile, dtype=torch.float64))
            self.neuron_fires[i] += stats.neuron_counts.double()

    def _buffers(self) -> list[torch.Tensor]:
        return [self.tokens.view(1), self.l1, self.active_hist, self.tile_hist, self.neuron_fires]

    @torch.no_grad()
    def summarize(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        """Reduce over all ranks (one collective), return `sparsity/...` metrics, and reset."""
        buffers = self._buffers()
        flat = torch.cat([b.flatten() for b in buffers])
        flat = all_reduce_sum(flat, group).cpu()
        for b in buffers:
            b.zero_()
        tokens = flat[0].item()
        if tokens == 0:
            return {}
        sizes = [b.numel() for b in buffers[1:]]
        l1, active_hist, tile_hist, fires = (
            chunk.view_as(b) for chunk, b in zip(flat[1:].split(sizes), buffers[1:]))
        per_layer = _layer_metrics(tokens, l1, active_hist, tile_hist, fires, self.d_ff)
        out = {f"sparsity/layer_{i}/{key}": value for i, layer in enumerate(per_layer) for key, value in layer.items()}
        for key in AGGREGATED:
            values = [layer[key] for layer in per_layer]
            out.update({f"sparsity/{key}/min": min(values), f"sparsity/{key}/mean": sum(values) / len(values),
                        f"sparsity/{key}/max": max(values)})
        out["sparsity/active_max_any_layer"] = max(layer["active_max"] for layer in per_layer)
        out["sparsity/worst_tile"] = max(layer["worst_tile"] for layer in per_layer)
        out.update(_overflow_metrics(active_hist, tile_hist))
        return out


def _overflow_metrics(active_hist: torch.Tensor, tile_hist: torch.Tensor) -> dict[str, float]:
    """Rows (token x layer) past the kernels' packed formats over the interval, whatever the kernel
    mode: past the hybrid ELL width (their extra pairs come from the dense backup), and with a
    256-wide tile past TwELL's slots (that tile is read from the dense gate row). Exact either way:
    these say how much of the work takes the slower exact path."""
    out = {"kernel/overflow_rows": float(active_hist[:, DEFAULT_ELL_WIDTH + 1:].sum())}
    if DEFAULT_TILE == STATS_TILE:
        out["kernel/twell_overflow_rows"] = float(tile_hist[:, DEFAULT_SLOTS + 1:].sum())
    return out


def _percentile(hist: torch.Tensor, q: float) -> float:
    cdf = hist.cumsum(0)
    return float(torch.searchsorted(cdf, q * cdf[-1]).item())


def _max_bin(hist: torch.Tensor) -> float:
    nonzero = hist.nonzero()
    return float(nonzero.max().item()) if nonzero.numel() else 0.0


def _layer_metrics(tokens, l1, active_hist, tile_hist, fires, d_ff) -> list[dict[str, float]]:
    bins = torch.arange(d_ff + 1, dtype=torch.float64)
    layers = []
    for i in range(l1.shape[0]):
        mean_active = float((active_hist[i] * bins).sum() / tokens)
        layers.append({
            "active_per_token": mean_active,
            "active_frac": mean_active / d_ff,
            "l1_per_token": float(l1[i] / tokens),
            "dead_frac": float((fires[i] == 0).double().mean()),
            "active_p50": _percentile(active_hist[i], 0.5),
            "active_p99": _percentile(active_hist[i], 0.99),
            "active_max": _max_bin(active_hist[i]),
            "worst_tile": _max_bin(tile_hist[i]),
        })
    return layers
