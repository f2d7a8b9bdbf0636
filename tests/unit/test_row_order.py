"""The longest-first token order (kernels/row_order.py) on CPU, where it is the PyTorch reference, and
an nvcc compile of its kernels (the GPU check against the reference is tests/gpu/test_row_order.py)."""
import shutil

import pytest
import torch

from sparse_llm.kernels.row_order import BUCKETS, length_keys, longest_first


def test_keys_are_exact_below_64_and_sixteen_steps_an_octave_above():
    keys = length_keys(torch.arange(0, 1 << 19))
    bucket = BUCKETS - 1 - keys
    assert torch.equal(bucket[:64], torch.arange(64))
    assert bucket[64:128].unique().numel() == 16 and bucket[128:256].unique().numel() == 16
    assert (bucket.diff() >= 0).all(), "longer rows never get a later bucket"
    assert bucket[127] < bucket[128], "the default long-row threshold (128) is a bucket boundary"
    assert bucket[:65505].max() < BUCKETS - 1, "no clamping up to the largest d_ff the kernels take"
    assert bucket[-1] == BUCKETS - 1
    assert keys.dtype == torch.int64 and length_keys(torch.tensor([-5])).item() == BUCKETS - 1


@pytest.mark.parametrize("n", [1, 7, 1024, 2500])
def test_order_is_longest_first_with_ties_in_index_order(n):
    gen = torch.Generator().manual_seed(n)
    lengths = (torch.rand(n, generator=gen) ** 8 * 3000).to(torch.int32)
    lengths[::5] = 40  # many exact ties
    order, split = longest_first(lengths, 128)
    assert order.dtype == torch.int32 and torch.equal(order.sort().values, torch.arange(n, dtype=torch.int32))
    keys = length_keys(lengths)[order.long()]
    assert (keys.diff() >= 0).all()
    same = keys[1:] == keys[:-1]
    assert (order[1:][same] > order[:-1][same]).all(), "ties keep index order"
    assert split.item() == int((lengths >= 128).sum())
    assert (lengths[order[:split].long()] >= 128).all(), "the rows to split come first"
    assert longest_first(lengths)[1] is None


def test_strided_lengths_and_errors():
    table = torch.arange(60, dtype=torch.int32).reshape(20, 3)
    order, _ = longest_first(table[:, -1])
    assert torch.equal(order, torch.arange(19, -1, -1, dtype=torch.int32))
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        longest_first(table)
    assert longest_first(torch.zeros(0, dtype=torch.int32), 1)[0].numel() == 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile-check CUDA")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_nvcc_compiles(arch):
    from sparse_llm.kernels import row_order
    from sparse_llm.kernels.loader import nvcc_compile_check

    (source, defines), = row_order.kernel_variants()
    report = nvcc_compile_check(source, arch, defines)
    assert "error" not in report.lower() and report.count("0 bytes spill stores") == 2
