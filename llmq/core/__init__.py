"""The types and helpers every other part of llmq shares; nothing here imports the rest of llmq."""
