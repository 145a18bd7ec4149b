"""Supervised rows and loss: only the reference's assistant tokens carry loss, never prompt, tool or image tokens."""
import io
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from varft import batch as batch_lib
from varft import grpo, prompts, sft, sft_data
from varft.models.qwen25vl import config as model_config_lib
from varft.models.qwen25vl import model as qwen_model
from varft.processing import chat

INFORMATION = "<information> 1. Content:Kalo Works. Kalo Works was founded in 1901. </information>"


@pytest.fixture(scope="module")
def tokenizer():
  return chat.load_tokenizer(None)


def _png(color) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (56, 56), color).save(buffer, format="PNG")
  return buffer.getvalue()


def _search_steps():
  base = {"task": "search", "question": "In which year was the company founded?", "images": [_png((200, 0, 0))]}
  return [
      {
          **base, "id": "0:kalo:search",
          "step_type": "search",
          "context": "",
          "solution": "<search> Kalo Works founded </search>"
      },
      {
          **base, "id": "1:kalo:answer",
          "step_type": "answer",
          "solution": "<answer> 1901 </answer>",
          "context": f"<think> Look it up. </think>\n<search> Kalo Works founded </search>\n{INFORMATION}",
          "gt": "<think> The documents say 1901. </think>\n<answer> 1901 </answer>"
      },
  ]


def _coding_steps():
  base = {"task": "coding", "question": "What code is printed on the label?", "images": [_png((0, 0, 90))]}
  return [
      {
          **base, "id": "0:lbl:problem",
          "step_type": "problem",
          "context": "",
          "solution": "<problem> {'rotation90'} </problem>"
      },
      {
          **base, "id": "1:lbl:code",
          "step_type": "code",
          "context": "<problem> {'rotation90'} </problem>",
          "solution": "<code>\n```python\nimport cv2\n```\n</code>"
      },
      {
          **base, "id": "2:lbl:answer",
          "step_type": "answer",
          "images": [_png((0, 200, 0))],
          "context": "<problem> {'rotation90'} </problem>\n<code>...</code>",
          "solution": "<answer> ABC-123 </answer>"
      },
  ]


def _builder(tokenizer, max_tool_output_tokens=512):
  return sft_data.RowBuilder(tokenizer, merge=2, min_pixels=56 * 56, max_pixels=56 * 56,
                             max_tool_output_tokens=max_tool_output_tokens)


def _split(tokenizer, row):
  tokens, mask = np.asarray(row.tokens), np.asarray(row.loss_mask)
  return tokenizer.decode(tokens[mask > 0]), tokenizer.decode(tokens[mask == 0]), tokens, mask


def test_stepwise_row_puts_loss_on_the_reference_turn_only(tokenizer):
  steps = _search_steps()
  row = _builder(tokenizer).stepwise(steps[1])
  taught, rest, tokens, mask = _split(tokenizer, row)
  assert taught == steps[1]["gt"] + chat.IM_END
  # The prompt (agent prompt, query, earlier steps with the search results) and the image carry no loss.
  assert prompts.SEARCH_AGENT in rest and INFORMATION in rest and steps[1]["question"] in rest
  image_tokens = tokens == tokenizer.image_pad_id
  assert image_tokens.sum() == 4 and not mask[image_tokens].any()
  assert mask[-1] == 1 and tokens[-1] == tokenizer.im_end_id
  # The loss tokens are one contiguous run at the end: the assistant turn after the generation prompt.
  first = int(np.argmax(mask))
  assert mask[first:].all() and tokenizer.decode(tokens[:first]).endswith(chat.generation_prompt())


def test_a_record_without_gt_is_taught_with_a_think_before_its_step(tokenizer):
  turn = sft_data.reference_turn(_search_steps()[0])
  assert turn.startswith("<think>") and turn.endswith("</think>\n<search> Kalo Works founded </search>")
  with pytest.raises(sft_data.UnusableReference):
    sft_data.reference_turn({"id": "x", "solution": ""})


def test_multiturn_row_masks_the_search_results(tokenizer):
  steps = _search_steps()
  row = _builder(tokenizer).multiturn(steps)
  taught, rest, _, _ = _split(tokenizer, row)
  turns = [sft_data.reference_turn(s) for s in steps]
  assert taught == "".join(t + chat.IM_END for t in turns)
  assert INFORMATION in rest and "Look it up" not in rest  # the bare query: no earlier steps in the prompt
  assert chat.IM_START + "user\n" + INFORMATION in tokenizer.decode(row.tokens)


def test_multiturn_row_masks_tips_and_the_repaired_image(tokenizer):
  steps = _coding_steps()
  builder = _builder(tokenizer)
  row = builder.multiturn(steps)
  taught, rest, tokens, mask = _split(tokenizer, row)
  assert taught.count(chat.IM_END) == 3 and "<answer> ABC-123 </answer>" in taught
  assert prompts.problem_tip(["rotation90"]) in rest and "<tips>" not in taught
  assert len(row.images) == 2  # the prompt image, then the code step's output image
  image_tokens = tokens == tokenizer.image_pad_id
  assert image_tokens.sum() == 8 and not mask[image_tokens].any()
  # Every image token knows its image, and the positions of the output image are 3-D (not text positions).
  batch = _collate([row], builder, model_config_lib.get_config("tiny").vision)
  index, positions = batch["image_index"][0, :len(tokens)], batch["positions"][:, 0, :len(tokens)]
  assert (index[image_tokens] >= 0).all() and (index[~image_tokens] < 0).all()
  assert len(set(index[image_tokens])) == 8  # the two images are distinct cells of the device's table
  output_image = positions[:, np.flatnonzero(image_tokens)[4:]]
  assert (output_image[1] != output_image[2]).any() and len(set(output_image[0])) == 1
  # The schema of varft.batch: one device table with both 4x4-patch images, each on its own attention blocks (a
  # multiple of the 64-patch bucket), and an empty second row.
  _, needed = batch_lib.image_starts([[1, 4, 4]] * 2, model_config_lib.get_config("tiny").vision)
  assert batch["pixel_values"].shape[:2] == (1, -(-needed // 64) *
                                             64) and batch["image_grid_thw"][0].tolist() == [[1, 4, 4]] * 2
  assert batch["tokens"].shape == (2, 1024) and not batch["attention_mask"][1].any()
  assert batch["group_ids"].tolist() == [0, 1] and not batch["sampler_logps"].any()


def test_long_tool_output_is_cut_like_the_rollout_and_never_taught(tokenizer):
  steps = _search_steps()
  steps[1]["context"] = "<information> " + "word " * 300 + "</information>"
  row = _builder(tokenizer, max_tool_output_tokens=16).multiturn(steps)
  taught, rest, _, _ = _split(tokenizer, row)
  assert "tool output truncated" in rest and "word" not in taught


def test_multiturn_needs_the_observation_of_each_step(tokenizer):
  steps = _search_steps()
  steps[1]["context"] = "no results here"
  with pytest.raises(sft_data.UnusableReference, match="no <information>"):
    _builder(tokenizer).multiturn(steps)


def test_reference_source_groups_steps_into_trajectories():
  steps = _coding_steps() + _search_steps()
  shuffled = [steps[i] for i in (4, 2, 0, 3, 1)]
  source = sft_data.ReferenceSource(shuffled, "multiturn")
  units = sorted(([s["id"] for s in source[i]] for i in range(len(source))), key=len)
  assert units == [["0:kalo:search", "1:kalo:answer"], ["0:lbl:problem", "1:lbl:code", "2:lbl:answer"]]
  assert len(sft_data.ReferenceSource(shuffled, "stepwise")) == 5


def _collate(rows, builder, vision_cfg, num_rows=2):
  return sft_data.collate(rows, builder.table, num_rows=num_rows, num_devices=1, length_buckets=(1024,),
                          patch_buckets=(64,), vision_cfg=vision_cfg)


def _tiny_batch(tokenizer):
  builder = _builder(tokenizer)
  rows = [builder.multiturn(_search_steps()), builder.stepwise(_coding_steps()[1])]
  cfg = model_config_lib.get_config("tiny").replace(dtype="float32", remat=False)
  batch = _collate(rows, builder, cfg.vision)
  batch.pop("image_grid_thw")
  return cfg, batch


def test_loss_is_the_mean_nll_of_the_masked_tokens_only(tokenizer):
  cfg, batch = _tiny_batch(tokenizer)
  params = qwen_model.init_params(jax.random.key(0), cfg)
  scfg = sft.SFTConfig()
  optimizer, _ = grpo.make_optimizer(1e-3, 10)
  state = grpo.init_train_state(params, optimizer)
  # A stray 1 on image and padding positions must not reach the loss.
  polluted = dict(
      batch, loss_mask=np.where((batch["image_index"] >= 0) | (batch["attention_mask"] == 0), 1.0, batch["loss_mask"]))
  prepared = sft.prepare_batch(polluted, scfg)
  np.testing.assert_array_equal(np.asarray(prepared["loss_mask"]), batch["loss_mask"])
  _, metrics = jax.jit(sft.make_sft_step(cfg, scfg, optimizer))(state, prepared)
  embeds = grpo.encode_images(params, cfg, batch)
  logps, _ = grpo.sequence_logps(params, cfg, jax.tree.map(jnp.asarray, batch), embeds)
  mask = batch["loss_mask"] > 0
  expected = -float(np.asarray(logps)[mask].mean())
  assert float(metrics["sft/nll_per_token"]) == pytest.approx(expected, rel=1e-4)
  assert float(metrics["train/loss_tokens"]) == mask.sum()
  # With the prompt and tool tokens on the mask the loss would be a different number.
  everything = (batch["attention_mask"] > 0) & (batch["image_index"] < 0)
  assert abs(-float(np.asarray(logps)[everything].mean()) - expected) > 1e-3


def test_micro_batches_and_row_loss_slots_give_the_full_batch_update(tokenizer):
  cfg, batch = _tiny_batch(tokenizer)
  params = qwen_model.init_params(jax.random.key(1), cfg)
  optimizer, _ = grpo.make_optimizer(1e-3, 10)
  results = []
  slots = grpo.row_loss_token_bucket(batch["loss_mask"])
  for scfg, bucket in ((sft.SFTConfig(), None), (sft.SFTConfig(micro_batches=2), slots)):
    step = jax.jit(sft.make_sft_step(cfg, scfg, optimizer), static_argnames="row_loss_tokens")
    state = grpo.init_train_state(jax.tree.map(jnp.copy, params), optimizer)
    results.append(step(state, sft.prepare_batch(batch, scfg), row_loss_tokens=bucket))
  (full_state, full), (micro_state, micro) = results
  assert float(micro["sft/loss"]) == pytest.approx(float(full["sft/loss"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(full_state["params"]), jax.tree.leaves(micro_state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_think_step_teaches_the_short_sentence_instead_of_gt(tokenizer):
  step = _search_steps()[1]
  assert sft_data.reference_turn(step) == step["gt"]
  short = sft_data.reference_turn(step, "step")
  assert short == "<think> Now I can answer. </think>\n<answer> 1901 </answer>"
  row = sft_data.RowBuilder(tokenizer, merge=2, min_pixels=56 * 56, max_pixels=56 * 56, max_tool_output_tokens=64,
                            think="step").stepwise(step)
  taught, _, _, _ = _split(tokenizer, row)
  assert taught == short + chat.IM_END


def test_each_step_sentence_names_its_action_last_and_shares_no_word(tmp_path):
  """A tiny model picks the action tag by copying the word just before `</think>`: each short think of the coding
  steps ends with its action's name, no two share a word it could blend, and none starts with a word of the demo's
  reference thinks (which the step's context holds)."""
  from varft.data import demo
  words = lambda text: re.findall(r"\w+", text.lower())
  thinks = {}
  for step in ("problem", "code", "answer"):
    turn = sft_data.reference_turn({"solution": f"<{step}> x </{step}>"}, "step")
    match = re.fullmatch(r"<think> (.*) </think>\n<(\w+)> x </\w+>", turn)
    assert match and match.group(2) == step and words(match.group(1))[-1] == step, turn
    thinks[step] = words(match.group(1))
  for step, think in thinks.items():
    assert not set(think) & set().union(*(set(w) for s, w in thinks.items() if s != step)), thinks
  paths = demo.generate(str(tmp_path / "demo"))
  with open(os.path.join(paths["mat_dir"], "MAT-Training", "rft_agent_code_1_2k.json")) as f:
    contexts = [r.get("context", "") for r in json.load(f)]
  context_words = set(words(" ".join(re.findall(r"<think>(.*?)</think>", " ".join(contexts)))))
  assert not {think[0] for think in thinks.values()} & context_words, context_words
