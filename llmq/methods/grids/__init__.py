"""The grids methods round onto: compressed-tensors' integer groups, GGUF's block types, ternary values.

Each implements llmq/core/interfaces.py's Grid; a target picks one per Linear.
"""
