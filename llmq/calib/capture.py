"""Running part of a decoder layer: stop the forward pass once a given module has been reached."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook once the part of the forward pass we need has run."""


@dataclass
class LayerInput:
    hidden: torch.Tensor  # [batch, seq, hidden]
    kwargs: dict  # everything else the current decoder layer is called with
    layer_kwargs: list[dict] = field(default_factory=list)  # per layer: sliding/global layers get other masks/rope

    def for_layer(self, index: int) -> None:
        """Take layer `index`'s keyword arguments (masks, rotary embeddings) as the current ones."""
        if self.layer_kwargs:
            self.kwargs = self.layer_kwargs[index]


def layer_output(output) -> torch.Tensor:
    """Decoder layers and attention modules return a tensor or a tuple starting with it."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def run_until(layer: nn.Module, module: nn.Module, inputs: list[LayerInput], on_input: Callable[[tuple, dict], None]) -> None:
    """Run `layer` on every batch until `module` is called; hand its (args, kwargs) to `on_input`."""

    def stop(mod, args, kwargs):
        on_input(args, kwargs)
        raise StopForward

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for item in inputs:
            try:
                layer(item.hidden, **item.kwargs)
            except StopForward:
                pass
    finally:
        handle.remove()


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The main input of a module call: its first positional argument or `hidden_states`."""
    return args[0] if args else kwargs["hidden_states"]
