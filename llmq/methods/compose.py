"""A chain of methods run as one: layer transforms (AWQ) followed by the rounding method that ends the chain."""

from __future__ import annotations

from llmq.core.interfaces import Method


class Composed(Method):
    def __init__(self, name: str, steps: list[Method]):
        super().__init__(steps[-1].options)
        self.name, self.steps, self.rounding = name, steps, steps[-1]
        self.needs_data = any(step.needs_data for step in steps)
        self.statistic = self.rounding.statistic
        self.orders_columns = self.rounding.orders_columns
        self.ternary = self.rounding.ternary
        self.searches = any(step.searches for step in steps)
        self.folds = any(step.folds for step in steps)
        self.side_files = tuple(name for step in steps for name in step.side_files)
        self.whole_model = any(step.whole_model for step in steps)
        self.repeatable_model_step = all(step.repeatable_model_step or not step.whole_model for step in steps)

    def check(self, config):
        for step in self.steps:
            step.check(config)

    def prepare_model(self, model, context):
        notes = [note for step in self.steps if (note := step.prepare_model(model, context))]
        return "; ".join(notes) or None

    def prepare_layer(self, layer, layer_map, inputs, search_scheme):
        for step in self.steps:
            step.prepare_layer(layer, layer_map, inputs, search_scheme)

    def quantize(self, weight, stats, grid):
        return self.rounding.quantize(weight, stats, grid)
