"""Model config presets / HF config layouts, and host-side M-RoPE positions."""
import json

import numpy as np
import pytest

from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import rope


def test_presets_have_published_sizes():
  c3, c7 = config_lib.get_config("3b"), config_lib.get_config("7b")
  assert (c3.text.hidden_size, c3.text.num_layers, c3.text.num_kv_heads, c3.text.tie_word_embeddings) == (2048, 36, 2,
                                                                                                          True)
  assert (c7.text.hidden_size, c7.text.num_layers, c7.text.num_kv_heads, c7.text.tie_word_embeddings) == (3584, 28, 4,
                                                                                                          False)
  assert c7.vision.out_hidden_size == 3584 and c7.vision.patch_dim == 1176
  assert config_lib.get_config("tiny").text.vocab_size == 151936


def test_unknown_name_and_invalid_values_fail_clearly():
  with pytest.raises(ValueError, match="Unknown Qwen2.5-VL model 'huge'"):
    config_lib.get_config("huge")
  tiny = config_lib.get_config("tiny")
  with pytest.raises(ValueError, match="mrope_section"):
    tiny.replace(text=tiny.text.__class__(hidden_size=64, num_heads=4, num_kv_heads=2, mrope_section=(16, 24, 24)))
  with pytest.raises(ValueError, match="dtype"):
    tiny.replace(dtype="int8")


def test_hf_config_round_trip_nested_and_legacy_layout(tmp_path):
  tiny = config_lib.get_config("7b")
  nested = config_lib.to_hf_config(tiny)
  assert config_lib.from_hf_config(nested) == tiny
  # The flat layout of hub folders: text keys at the top level, mrope_section under rope_scaling.
  legacy = {k: v for k, v in nested.items() if k != "text_config"}
  text = dict(nested["text_config"])
  rope_params = text.pop("rope_parameters")
  legacy.update(text)
  legacy["rope_theta"] = rope_params["rope_theta"]
  legacy["rope_scaling"] = {"type": "mrope", "mrope_section": rope_params["mrope_section"]}
  (tmp_path / "config.json").write_text(json.dumps(legacy))
  assert config_lib.get_config(str(tmp_path)) == tiny
  with pytest.raises(ValueError, match="missing the key 'vocab_size'"):
    config_lib.from_hf_config({"vision_config": nested["vision_config"]})
  with pytest.raises(FileNotFoundError, match="config.json"):
    config_lib.from_hf_config(str(tmp_path / "nowhere"))


def test_sequence_positions_text_image_text():
  cfg = config_lib.get_config("tiny")
  img = cfg.image_token_id
  # grid (1, 4, 6) -> 2 x 3 merged tokens
  ids = np.array([[1, 2, cfg.vision_start_token_id] + [img] * 6 + [cfg.vision_end_token_id, 5]])
  pos, delta = rope.sequence_positions(ids, np.array([[1, 4, 6]]), cfg)
  expected_t = [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7]
  expected_h = [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7]
  expected_w = [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]
  np.testing.assert_array_equal(pos[:, 0], [expected_t, expected_h, expected_w])
  assert delta[0] == 8 - 11


def test_incremental_positions_equal_whole_sequence():
  cfg = config_lib.get_config("tiny")
  img = cfg.image_token_id
  ids = [7, 8, cfg.vision_start_token_id] + [img] * 4 + [9] + [img] * 6 + [3, 4]
  grids = np.array([[1, 4, 4], [1, 6, 4]])
  whole, _ = rope.sequence_positions(np.array([ids]), grids, cfg)
  parts, nxt = [], 0
  for piece in ("text3", "img0", "text1", "img1", "text2"):
    if piece.startswith("text"):
      p, nxt = rope.text_positions(nxt, int(piece[4:]))
    else:
      p, nxt = rope.image_positions(nxt, grids[int(piece[3:])], cfg.vision.spatial_merge_size)
    parts.append(p)
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole[:, 0])


def test_padding_gets_zero_and_mismatched_images_fail():
  cfg = config_lib.get_config("tiny")
  ids = np.array([[0, 0, 5, 6], [1, 2, 3, 4]])
  mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  pos, _ = rope.sequence_positions(ids, None, cfg, mask)
  np.testing.assert_array_equal(pos[0, 0], [0, 0, 0, 1])
  bad = np.array([[1, cfg.image_token_id, cfg.image_token_id, 2]])
  with pytest.raises(ValueError, match="more image tokens"):
    rope.sequence_positions(bad, None, cfg)
  with pytest.raises(ValueError, match="does not match"):
    rope.sequence_positions(bad, np.array([[1, 4, 4]]), cfg)
