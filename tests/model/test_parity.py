"""Logit / vision-tower / position parity with transformers' Qwen2_5_VLForConditionalGeneration (fp32, CPU)."""
import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip("torch")

from tests import hf_tiny  # noqa: E402
from varft.models.qwen25vl import config as config_lib  # noqa: E402
from varft.models.qwen25vl import hf, model, rope, vision  # noqa: E402
from varft.processing import chat  # noqa: E402
from varft.processing import image as image_lib  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  path, torch_model = hf_tiny.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tied"), tie=True)
  config = config_lib.from_hf_config(path)
  return config, hf.params_from_state_dict(torch_model.state_dict(), config), torch_model


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  # Three vision blocks with the full-attention block in the middle, a different seed: a second, distinct model.
  path, torch_model = hf_tiny.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("untied"), tie=False, seed=1,
                                                      vision_config={
                                                          "depth": 3,
                                                          "fullatt_block_indexes": [1]
                                                      })
  config = config_lib.from_hf_config(path)
  return config, hf.params_from_state_dict(torch_model.state_dict(), config), torch_model


@pytest.fixture(scope="module")
def tokenizer():
  return chat.load_tokenizer()


def _image(width, height, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encode(tokenizer, texts_and_images):
  """Token ids and (patches, grids) for one user turn holding text parts and PIL images."""
  content, patches, grids = [], [], []
  for part in texts_and_images:
    if isinstance(part, str):
      content.append({"type": "text", "text": part})
    else:
      p, g = image_lib.process_image(part, max_pixels=448 * 448)
      content.append({"type": "image"})
      patches.append(p)
      grids.append(g)
  ids = chat.encode_messages(tokenizer, [{"role": "user", "content": content}], grids or None)
  return ids, patches, grids


def _batch(tokenizer, rows):
  encoded = [_encode(tokenizer, row) for row in rows]
  length = max(len(ids) for ids, _, _ in encoded)
  input_ids = np.full((len(rows), length), tokenizer.pad_id, np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for r, (ids, _, _) in enumerate(encoded):
    input_ids[r, :len(ids)] = ids
    mask[r, :len(ids)] = 1
  patches = [p for _, ps, _ in encoded for p in ps]
  grids = [g for _, _, gs in encoded for g in gs]
  if not patches:
    return input_ids, mask, None, None
  return input_ids, mask, np.concatenate(patches), np.stack(grids)


def _torch_logits(torch_model, config, input_ids, mask, pixel_values, grids):
  kwargs = dict(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                mm_token_type_ids=torch.from_numpy((input_ids == config.image_token_id).astype(np.int64)))
  if pixel_values is not None:
    kwargs.update(pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grids))
  with torch.no_grad():
    return torch_model(**kwargs).logits.numpy()


def _check(setup, tokenizer, rows):
  config, params, torch_model = setup
  input_ids, mask, pixel_values, grids = _batch(tokenizer, rows)
  got = np.asarray(model.apply(params, config, input_ids, mask, pixel_values, grids))
  want = _torch_logits(torch_model, config, input_ids, mask, pixel_values, grids)
  valid = mask.astype(bool)
  assert got.shape == want.shape
  assert np.abs(got[valid] - want[valid]).max() <= TOL
  return input_ids, grids


def test_text_only(tied, tokenizer):
  _check(tied, tokenizer, [["Hello there, how are you?"], ["Short."]])


def test_one_image_several_windows(tied, tokenizer):
  # 252x196 px -> 9x7 merged cells -> 3x2 windows, four of them partial.
  _check(tied, tokenizer, [["Look:", _image(196, 252, 0), "What is it?"]])


def test_two_images_of_different_sizes_in_one_sequence(tied, tokenizer):
  input_ids, grids = _check(tied, tokenizer, [["A", _image(224, 336, 1), "and B", _image(90, 60, 2), "?"]])
  assert len(grids) == 2 and not np.array_equal(grids[0], grids[1])


def test_padded_batch_of_two(tied, tokenizer):
  _check(tied, tokenizer,
         [["One image", _image(130, 100, 3)],
          ["Two images", _image(60, 200, 4), "then",
           _image(300, 280, 5), "compare them at length"]])


def test_untied_with_full_attention_block_in_the_middle(untied, tokenizer):
  assert not untied[0].text.tie_word_embeddings and "lm_head" in untied[1]["text"]
  _check(untied, tokenizer, [["Hi", _image(336, 224, 6)], ["Text only row, right padded to the other row."]])


def test_vision_tower_with_padding(untied):
  config, params, torch_model = untied
  grids = np.array([[1, 16, 24], [1, 18, 14], [1, 2, 2]])
  real = vision.num_patches(grids)
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((real + 36, 1176)).astype(np.float32)
  with torch.no_grad():
    want = torch_model.model.visual(torch.from_numpy(pixels[:real]),
                                    grid_thw=torch.from_numpy(grids)).pooler_output.numpy()
  got = model.encode_images(params, config, pixels, vision.vision_inputs(grids, config.vision, real + 36))
  got = np.asarray(got)
  assert got.shape == ((real + 36) // 4, config.text.hidden_size)
  assert np.abs(got[:real // 4] - want).max() <= TOL
  # Changing the padding patches changes nothing in the real outputs.
  pixels[real:] = 100.0
  again = np.asarray(model.encode_images(params, config, pixels, vision.vision_inputs(grids, config.vision, real + 36)))
  np.testing.assert_array_equal(again[:real // 4], got[:real // 4])


def test_positions_match_get_rope_index(tied, tokenizer):
  config, _, torch_model = tied
  input_ids, mask, _, grids = _batch(tokenizer, [["x", _image(
      120, 80, 7), "y"], ["a", _image(60, 60, 8), _image(100, 64, 9), "b c d e f g"]])
  ours, deltas = rope.sequence_positions(input_ids, grids, config, mask)
  theirs, their_deltas = torch_model.model.get_rope_index(
      torch.from_numpy(input_ids), torch.from_numpy((input_ids == config.image_token_id).astype(np.int64)),
      image_grid_thw=torch.from_numpy(grids), attention_mask=torch.from_numpy(mask))
  np.testing.assert_array_equal(ours, theirs.numpy())
  np.testing.assert_array_equal(deltas, their_deltas.numpy().reshape(-1))
