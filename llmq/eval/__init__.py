"""Evaluation: perplexity and KL divergence of llmq's models (perplexity.py), and llama.cpp as an evaluator of GGUF
files (llamacpp.py)."""

from llmq.eval.perplexity import EvalResult, evaluate, evaluation_windows, is_quantized_dir, load_for_eval

__all__ = ["EvalResult", "evaluate", "evaluation_windows", "is_quantized_dir", "load_for_eval"]
