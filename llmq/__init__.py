"""llmq: weight quantization for large language models."""

from llmq.errors import LlmqError
from llmq.modeling import QuantLinear, load
from llmq.pipeline import QuantizeConfig, QuantizeResult, quantize

__version__ = "0.1.0"
__all__ = ["LlmqError", "QuantLinear", "QuantizeConfig", "QuantizeResult", "load", "quantize"]
