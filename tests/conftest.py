import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `python -m pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small prepared corpus (manifest path) that the tests write themselves, shared by the session."""
    from sparse_llm.data import prepare_corpus
    from tests.helpers import write_text_corpus

    root = tmp_path_factory.mktemp("tiny_corpus")
    texts = write_text_corpus(root / "text", documents=400)
    return prepare_corpus(texts, root / "shards", vocab_size=320, val_fraction=0.1, workers=1, progress=False)
