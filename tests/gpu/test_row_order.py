"""GPU check of the longest-first order's counting sort (kernels/cuda/row_order.cu) against its PyTorch
reference: the same permutation and split count, bit for bit, on fresh random lengths and adversarial
ones (all equal, all zero, one huge row, exact bucket edges), across chunk edges, and on a strided view."""
import pytest
import torch

from sparse_llm.kernels.row_order import longest_first, longest_first_reference

pytestmark = pytest.mark.gpu


def lengths_cases(n, gen):
    tail = (torch.rand(n, generator=gen, device="cuda") ** 12 * 6000).to(torch.int32)
    edges = torch.tensor([0, 63, 64, 127, 128, 129, 255, 256, 65504, 2**31 - 1], device="cuda", dtype=torch.int32)
    yield "heavy tail", tail
    yield "all equal", torch.full((n,), 29, dtype=torch.int32, device="cuda")
    yield "all zero", torch.zeros(n, dtype=torch.int32, device="cuda")
    one_huge = torch.zeros(n, dtype=torch.int32, device="cuda")
    one_huge[n // 2] = 5000
    yield "one long row", one_huge
    yield "bucket edges", edges[torch.randint(0, len(edges), (n,), generator=gen, device="cuda")]


@pytest.mark.parametrize("n", [1, 31, 1024, 1025, 16384, 131072 + 17])
@pytest.mark.parametrize("threshold", [128, 0, None])
def test_matches_reference(n, threshold):
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**62)
    for name, lengths in lengths_cases(n, gen):
        order, split = longest_first(lengths, threshold)
        expected_order, expected_split = longest_first_reference(lengths, threshold)
        assert torch.equal(order, expected_order), name
        if threshold is None:
            assert split is None
        else:
            assert split.dtype == torch.int32 and split.item() == expected_split.item(), name


def test_strided_view_and_graph_capture():
    table = torch.randint(0, 400, (5000, 22), dtype=torch.int32, device="cuda")
    lengths = table[:, -1]
    expected = longest_first_reference(lengths, 128)
    order, split = longest_first(lengths, 128)
    assert torch.equal(order, expected[0]) and split.item() == expected[1].item()
    graph = torch.cuda.CUDAGraph()  # no host sync inside: capturable
    with torch.cuda.graph(graph):
        captured = longest_first(lengths, 128)
    table[:, -1] = torch.randint(0, 400, (5000,), dtype=torch.int32, device="cuda")
    graph.replay()
    expected = longest_first_reference(table[:, -1], 128)
    assert torch.equal(captured[0], expected[0]) and captured[1].item() == expected[1].item()
