"""CUDA sparse-FFN kernels (TwELL inference, hybrid-format training), compiled at run time by CuPy.

Imported as ``sparse_llm.kernels`` (the folder is the repository's top-level ``kernels/``).
``reference`` holds the pure-PyTorch semantics: the test oracle and the CPU path.
"""
