"""Qwen2.5-VL in pure-functional JAX.

    config, params = qwen25vl.load_pretrained(hf_dir, dtype=jnp.bfloat16)
    logits = qwen25vl.apply(params, config, input_ids, attention_mask, pixel_values, image_grid_thw)
"""
from varft.models.qwen25vl.config import Qwen25VLConfig, get_config
from varft.models.qwen25vl.hf import load_pretrained, save_pretrained
from varft.models.qwen25vl.model import apply, init_params

__all__ = ["Qwen25VLConfig", "apply", "get_config", "init_params", "load_pretrained", "save_pretrained"]
