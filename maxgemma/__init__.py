"""maxgemma: pretrain Gemma-family language models on TPU pods with JAX."""

__version__ = "0.1.0"
