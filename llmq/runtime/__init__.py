"""Running quantized checkpoints: QuantLinear, `llmq.load`, and the kernels behind them."""
