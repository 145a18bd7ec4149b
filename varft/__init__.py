"""varft: Visual Agentic Reinforcement Fine-Tuning (arXiv 2505.14246) in JAX/Flax."""

__version__ = "0.1.0"
