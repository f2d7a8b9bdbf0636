"""How far bf16 noise alone moves a short training run: the 50-step model of the GPU parity test
(tests/gpu/test_train_gpu.py) trained with the reference FFN in bf16 and in float32, and with the
hybrid kernels, at two L1 coefficients; prints the loss at steps 1, 11, 21, 26, 31, 36, 41, 46, 50.
Behind the parity test's noise band (kernels/NOTES_hybrid.md, v9).

    PYTHONPATH=$PWD python kernels/experiments/parity_noise.py
"""
import json
import tempfile
from pathlib import Path

import train
from sparse_llm.data import prepare_corpus
from tests.gpu.test_train_gpu import SMALL
from tests.helpers import write_text_corpus

root = Path(tempfile.mkdtemp())
texts = write_text_corpus(root / "text", documents=400)
corpus = prepare_corpus(texts, root / "shards", vocab_size=320, val_fraction=0.1, workers=1, progress=False)
common = [o for o in SMALL if not o.startswith("sparsity.l1=")]
common += ["max_steps=50", "data=shards", f"data.path={corpus.parent}", f"output_dir={root}"]


def run(name, extra):
    assert train.main(common + extra + [f"run_name={name}"]) == 0
    loss = [json.loads(line)["loss/ce"] for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    print(f"{name:28s}", " ".join(f"{loss[i]:.4f}" for i in (0, 10, 20, 25, 30, 35, 40, 45, 49)), flush=True)


for l1 in ("0.05", "0.01"):
    run(f"torch_bf16_{l1}", ["kernel=torch", f"sparsity.l1={l1}"])
    run(f"torch_fp32_{l1}", ["kernel=torch", "precision=fp32", f"sparsity.l1={l1}"])
    run(f"hybrid_{l1}", ["kernel=hybrid", f"sparsity.l1={l1}"])
