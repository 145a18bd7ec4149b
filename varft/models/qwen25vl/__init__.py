"""Qwen2.5-VL in pure-functional JAX."""
