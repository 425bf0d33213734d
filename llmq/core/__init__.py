"""The types and helpers every other part of llmq shares; nothing here imports the rest of llmq."""

__version__ = "0.2.0"  # the one version source: pyproject.toml reads it (hatch), `llmq --version` prints it
