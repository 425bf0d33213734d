"""The grids methods round onto: compressed-tensors' integer groups, GGUF's block types, ternary values.

Each implements llmq/core/interfaces.py's Grid; a target picks one per Linear.
"""

# the lattice i-quants register their block types (blocks.BLOCK_TYPES) when imported; importing them here makes
# them known wherever a block type is looked up, without blocks.py importing the module that builds on it
from llmq.methods.grids import lattice  # noqa: E402,F401
