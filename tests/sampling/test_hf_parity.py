"""Greedy decoding is token-identical to transformers `generate(do_sample=False)` on the tiny checkpoint."""
import jax
import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip("torch")

from tests import hf_tiny  # noqa: E402
from varft import sampling, turns  # noqa: E402
from varft.models.qwen25vl import config as config_lib  # noqa: E402
from varft.models.qwen25vl import hf, model, rope, vision  # noqa: E402
from varft.processing import chat  # noqa: E402
from varft.processing import image as image_lib  # noqa: E402

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path, torch_model = hf_tiny.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny"), tie=True)
  # Larger decoder weights so that greedy decoding does not collapse onto one repeated token.
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if "language_model" in name and p.ndim > 1 and "embed" not in name:
        p.mul_(4.0)
  config = config_lib.from_hf_config(path)
  tokenizer = chat.load_tokenizer(path)
  table = sampling.make_stop_table(tokenizer, config.text.vocab_size, turns.AGENT_STOP_TAGS)
  sampler = sampling.Sampler(config, sampling.SamplingConfig(temperature=0, max_new_tokens=NEW_TOKENS, eos_ids=()),
                             table)
  return config, hf.params_from_state_dict(torch_model.state_dict(), config), torch_model, tokenizer, sampler


def _prompt(tokenizer, image=None):
  content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": "Describe this, briefly."}]
  grids, patches = None, None
  if image is not None:
    patches, grid = image_lib.process_image(image, max_pixels=hf_tiny.TINY_MAX_PIXELS)
    grids = grid[None]
  return chat.encode_messages(tokenizer, [{"role": "user", "content": content}], grids), patches, grids


def _ours(config, params, sampler, ids, patches, grids):
  ids_np = np.asarray([ids])
  positions, _ = rope.sequence_positions(ids_np, grids, config)
  length = 128
  chunk = sampling.Chunk(
      np.pad(ids_np, ((0, 0), (0, length - len(ids)))), np.pad(positions, ((0, 0), (0, 0), (0, length - len(ids)))),
      np.pad(np.ones_like(ids_np), ((0, 0), (0, length - len(ids)))),
      np.pad(model.image_index_for(ids_np, config), ((0, 0), (0, length - len(ids))), constant_values=-1))
  image_embeds = None
  if patches is not None:
    padded = 256
    pixel_values = np.pad(patches, ((0, padded - len(patches)), (0, 0)))
    image_embeds = model.encode_images(params, config, pixel_values, vision.vision_inputs(grids, config.vision, padded))
  hidden, cache = sampler.extend(params, sampler.new_cache(1, 160), chunk, image_embeds)
  out, _ = sampler.generate(params, cache, hidden, [int(positions.max()) + 1], jax.random.PRNGKey(0), [NEW_TOKENS])
  return [int(t) for t in out.tokens[0, :out.num_tokens[0]]]


def _theirs(config, torch_model, ids, patches, grids):
  input_ids = torch.tensor([ids])
  kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == config.image_token_id).long())
  if patches is not None:
    kwargs.update(pixel_values=torch.from_numpy(patches), image_grid_thw=torch.from_numpy(np.asarray(grids)))
  with torch.no_grad():
    out = torch_model.generate(**kwargs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
  return out[0, len(ids):].tolist()


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_matches_transformers_generate(setup, with_image):
  config, params, torch_model, tokenizer, sampler = setup
  image = None
  if with_image:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 112, 3), dtype=np.uint8))
  ids, patches, grids = _prompt(tokenizer, image)
  ours = _ours(config, params, sampler, ids, patches, grids)
  theirs = _theirs(config, torch_model, ids, patches, grids)
  assert len(set(theirs)) > 2  # a real sequence, not one repeated token
  assert ours == theirs
