"""llmq: weight quantization for large language models."""

from llmq.core import __version__
from llmq.core.config import MethodOptions, QuantizeConfig, RunOptions, TargetOptions
from llmq.core.errors import LlmqError
from llmq.core.scheme import QuantScheme
from llmq.run import QuantizeResult, quantize
from llmq.runtime.modeling import QuantLinear, load

__all__ = ["__version__", "LlmqError", "MethodOptions", "QuantLinear", "QuantScheme", "QuantizeConfig", "QuantizeResult",
           "RunOptions", "TargetOptions", "load", "quantize"]
