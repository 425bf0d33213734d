"""The GGUF target: llama.cpp's mixture rules, its file writer, and the run's plan for them."""
