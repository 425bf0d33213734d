"""The types and helpers every other part of llmq shares; nothing here imports the rest of llmq."""

__version__ = "0.1.0"
