from sparse_llm.sparsity.l1 import l1_coefficient, l1_term
from sparse_llm.sparsity.stats import SparsityStats

__all__ = ["SparsityStats", "l1_coefficient", "l1_term"]
