"""A run's `hf/` export is a complete HF folder: transformers loads its tokenizer, image processor and model, and
varft accepts it as `model.hf_dir`."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

pytest.importorskip("torch")

from varft import checkpoint
from varft.models import qwen25vl
from varft.processing import chat, hf_files, image


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  config = qwen25vl.get_config("tiny")
  params = qwen25vl.init_params(jax.random.key(0), config, jnp.float32)
  out = str(tmp_path_factory.mktemp("run") / "hf")
  checkpoint.export_hf(params, config, out, tokenizer_dir=None, min_pixels=56 * 56, max_pixels=224 * 224)
  return out, config, params


def test_every_tokenizer_and_processor_file_is_written(exported):
  out, _, _ = exported
  assert set(hf_files.FILES) <= set(os.listdir(out))


def test_transformers_loads_the_tokenizer_the_image_processor_and_the_model(exported):
  from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
  out, _, _ = exported
  tok = AutoTokenizer.from_pretrained(out)
  ours = chat.load_tokenizer(None)
  assert tok("hello world").input_ids == ours.encode("hello world") != []
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  assert max(tok.get_vocab().values()) <= chat.LAST_QWEN25_TOKEN_ID
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
  assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
      chat.render_messages(messages)
  processor = AutoImageProcessor.from_pretrained(out)
  rgb = np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8)
  theirs = processor(images=[rgb], return_tensors="np")
  patches, grid = image.process_image(Image.fromarray(rgb), min_pixels=56 * 56, max_pixels=224 * 224)
  np.testing.assert_array_equal(theirs["image_grid_thw"][0], grid)
  np.testing.assert_allclose(theirs["pixel_values"], patches, atol=1e-5)
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
  assert model.config.text_config.hidden_size == qwen25vl.get_config("tiny").text.hidden_size


def test_varft_accepts_the_export_as_hf_dir(exported, tmp_path):
  from experiments import search
  from varft import run_config, train
  out, config, params = exported
  run = search.get_config("demo")
  run.model.hf_dir = out
  run_config.validate(run)
  loaded = train.model_config(run)
  assert (loaded.text.hidden_size, loaded.text.num_layers, loaded.vision.depth) == \
      (config.text.hidden_size, config.text.num_layers, config.vision.depth)
  assert chat.load_tokenizer(out).encode("hello world") == chat.load_tokenizer(None).encode("hello world")
  _, again = qwen25vl.load_pretrained(out, dtype=jnp.float32)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-2)  # exported in bf16
