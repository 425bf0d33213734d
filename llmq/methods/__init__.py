"""Quantization methods, by name. A new method is a new module plus one line in METHODS."""

from __future__ import annotations

from llmq.errors import LlmqError
from llmq.methods.awq import AWQ, AWQGPTQ
from llmq.methods.base import Method, MethodOptions
from llmq.methods.gptq import GPTQ
from llmq.methods.grid import QuantizedTensor, QuantScheme
from llmq.methods.rtn import RTN

METHODS: dict[str, type[Method]] = {
    RTN.name: RTN,
    GPTQ.name: GPTQ,
    AWQ.name: AWQ,
    AWQGPTQ.name: AWQGPTQ,
}


def get_method(name: str, scheme: QuantScheme, options: MethodOptions | None = None) -> Method:
    try:
        cls = METHODS[name]
    except KeyError:
        raise LlmqError(f"unknown --method {name!r}; choose one of: {', '.join(METHODS)}") from None
    return cls(scheme, options)


__all__ = ["METHODS", "Method", "MethodOptions", "QuantScheme", "QuantizedTensor", "get_method"]
