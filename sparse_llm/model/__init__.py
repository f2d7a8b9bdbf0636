from sparse_llm.model.ffn import FeedForward, FFNStats
from sparse_llm.model.flops import count_params, flops_per_token
from sparse_llm.model.transformer import ModelOutput, Transformer

__all__ = ["FFNStats", "FeedForward", "ModelOutput", "Transformer", "count_params", "flops_per_token"]
