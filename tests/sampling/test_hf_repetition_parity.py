"""Greedy decoding with a repetition penalty is token-identical to transformers `generate(repetition_penalty=...)`
on the tiny checkpoint, image prompt included (the penalty covers the whole prompt, image tokens too)."""
import jax
import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip("torch")

from tests import hf_tiny  # noqa: E402
from tests.sampling.test_hf_parity import _prompt  # noqa: E402
from varft import sampling  # noqa: E402
from varft.models.qwen25vl import config as config_lib  # noqa: E402
from varft.models.qwen25vl import hf, model, rope, vision  # noqa: E402
from varft.processing import chat  # noqa: E402

NEW_TOKENS = 12
PENALTY = 1.3


def _ours(config, params, sampler, ids, patches, grids, penalty):
  ids_np = np.asarray([ids])
  positions, _ = rope.sequence_positions(ids_np, grids, config)
  length, cache_len = 128, 160
  pad = lambda x, value=0: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - len(ids))], constant_values=value)
  chunk = sampling.Chunk(pad(ids_np), pad(positions), pad(np.ones_like(ids_np)),
                         pad(model.image_index_for(ids_np, config), -1))
  pixel_values = np.pad(patches, ((0, 256 - len(patches)), (0, 0)))
  image_embeds = model.encode_images(params, config, pixel_values, vision.vision_inputs(grids, config.vision, 256))
  hidden, cache = sampler.extend(params, sampler.new_cache(1, cache_len), chunk, image_embeds)
  context = np.full((1, cache_len), -1, np.int32)
  context[0, :len(ids)] = ids
  out, _ = sampler.generate(params, cache, hidden, [int(positions.max()) + 1], jax.random.PRNGKey(0), [NEW_TOKENS],
                            repetition=(context, np.asarray([penalty], np.float32)))
  return [int(t) for t in out.tokens[0, :out.num_tokens[0]]]


def _theirs(config, torch_model, ids, patches, grids, penalty):
  input_ids = torch.tensor([ids])
  with torch.no_grad():
    out = torch_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               mm_token_type_ids=(input_ids == config.image_token_id).long(),
                               pixel_values=torch.from_numpy(patches),
                               image_grid_thw=torch.from_numpy(np.asarray(grids)), do_sample=False,
                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, repetition_penalty=penalty)
  return out[0, len(ids):].tolist()


def test_penalised_greedy_matches_transformers_generate(tmp_path):
  path, torch_model = hf_tiny.make_tiny_hf_checkpoint(tmp_path, tie=True)  # default scale: greedy repeats
  config = config_lib.from_hf_config(path)
  params = hf.params_from_state_dict(torch_model.state_dict(), config)
  tokenizer = chat.load_tokenizer(path)
  sampler = sampling.Sampler(config, sampling.SamplingConfig(temperature=0, max_new_tokens=NEW_TOKENS, eos_ids=()),
                             sampling.make_stop_table(tokenizer, config.text.vocab_size, ()))
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8))
  ids, patches, grids = _prompt(tokenizer, image)
  ours = _ours(config, params, sampler, ids, patches, grids, PENALTY)
  assert ours == _theirs(config, torch_model, ids, patches, grids, PENALTY)
  assert ours != _theirs(config, torch_model, ids, patches, grids, 1.0)  # the penalty changed the sequence
