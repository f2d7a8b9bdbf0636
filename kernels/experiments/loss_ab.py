"""Same-run A/B of the LM loss, forward + backward at the paper's shape (8 x 2048 tokens, vocabulary
49152, bf16 logits): F.cross_entropy on a float32 copy of the logits (the trainer's loss before
kernels/cross_entropy.py), the same in checkpointed chunks of 4096 tokens (the interim
`parallel.loss_chunk_tokens=4096`), and `cross_entropy_sum` (one kernel; the gradient made in the
forward). Median of 20 with L2 flushed, and the peak memory above the logits and targets.

    PYTHONPATH=$PWD python kernels/experiments/loss_ab.py [tokens=16384] [vocab=49152]
"""
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparse_llm.kernels.bench_training import _flush_buffer, time_ms
from sparse_llm.kernels.cross_entropy import cross_entropy_sum

tokens, vocab = (int(a) for a in (sys.argv[1:] + ["16384", "49152"][len(sys.argv) - 1:]))
logits = (3 * torch.randn(tokens, vocab, device="cuda")).to(torch.bfloat16).requires_grad_()
targets = torch.randint(0, vocab, (tokens,), device="cuda")


def one_pass(x, t):
    return F.cross_entropy(x.float(), t, reduction="sum")


def chunked(x, t, chunk=4096):
    return sum(checkpoint(one_pass, a, b, use_reentrant=False) for a, b in zip(x.split(chunk), t.split(chunk)))


def step(loss_fn):
    (loss_fn(logits, targets) / tokens).backward()
    logits.grad = None


def peak_mib(loss_fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(loss_fn)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


flush = _flush_buffer()
ref = one_pass(logits, targets).item()
ours = cross_entropy_sum(logits, targets).item()
print(f"{tokens} x {vocab} bf16 logits; loss {ref:.2f} (F.cross_entropy) vs {ours:.2f} (ours), "
      f"rel {abs(ours - ref) / abs(ref):.1e}")
results = {}
for rnd in range(3):
    for name, fn in (("float32 one pass", one_pass), ("checkpointed chunks", chunked), ("ours", cross_entropy_sum)):
        results.setdefault(name, []).append(time_ms(lambda: step(fn), 20, flush))
for name, fn in (("float32 one pass", one_pass), ("checkpointed chunks", chunked), ("ours", cross_entropy_sum)):
    times = sorted(results[name])
    print(f"{name:>20}: fwd+bwd {times[1]:.2f} ms (rounds {', '.join(f'{t:.2f}' for t in results[name])}), "
          f"peak above the logits {peak_mib(fn):.0f} MiB", flush=True)
