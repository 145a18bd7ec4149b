"""Direct-answer baselines (the paper's evaluation_*_df.py): the exact single-turn prompt, greedy replies equal to
transformers' greedy `generate` on the same tokens, the whole reply (special tokens skipped) as the prediction."""
import dataclasses
import io

import jax
import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip("torch")

from tests import hf_tiny  # noqa: E402
from tests.rollout import scripted  # noqa: E402
from varft import rollout  # noqa: E402
from varft.eval import direct, stream  # noqa: E402
from varft.models.qwen25vl import config as config_lib  # noqa: E402
from varft.models.qwen25vl import hf, text  # noqa: E402
from varft.processing import chat  # noqa: E402

NEW_TOKENS = 6


def _png(width, height, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


EXAMPLES = [
    {
        "id": "m1",
        "question": "What is written on the sign?",
        "answers": ["OPEN"],
        "images": [_png(56, 84, 0)]
    },
    {
        "id": "h1",
        "question": "Who founded the brand?",
        "answers": ["Ada Lovelace"],
        "images": []
    },
    {
        "id": "h2",
        "question": "Where is the river?",
        "answers": ["Paris"],
        "images": []
    },
]
# The df scripts' turn: the HF template's default system turn, then [image] + question + "\n" + instruction.
EXPECTED_PROMPTS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>What is written on the sign?\n"
    "Answer the question directly. The answer should be very brief.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Who founded the brand?\nOnly Return the answer.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path, torch_model = hf_tiny.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny"), tie=True)
  config = config_lib.from_hf_config(path)
  params = hf.params_from_state_dict(torch_model.state_dict(), config)
  tokenizer = chat.load_tokenizer()
  engine = direct.DirectAnswerEngine(
      config, tokenizer,
      rollout.RolloutConfig(mode="multiturn", temperature=0.0, length_buckets=(128, 256), patch_buckets=(256,),
                            image_max_pixels=224 * 224, max_total_tokens=256), max_new_tokens=NEW_TOKENS)
  return config, params, torch_model, tokenizer, engine


def test_prompts_are_the_df_scripts_turn(setup):
  *_, engine = setup
  for example, expected in zip(EXAMPLES, EXPECTED_PROMPTS):
    row, images, _, rendered = engine.prompt(example)
    # One <|image_pad|> per merged image cell, as the processor expands it.
    assert chat.render_messages(direct.direct_messages(example)) == rendered == expected
    cells = sum(int(np.prod(im.grid)) // 4 for im in images.values())
    assert list(row.tokens).count(engine.tokenizer.image_pad_id) == cells and len(images) == len(example["images"])


def test_greedy_replies_equal_transformers_and_the_whole_reply_is_the_prediction(setup):
  config, params, torch_model, tokenizer, engine = setup
  forced = tokenizer.encode("Paris" + chat.IM_END)
  answering = scripted.ScriptedDirectEngine(config, tokenizer, engine.config, max_new_tokens=NEW_TOKENS,
                                            script=lambda b: forced if b == 2 else None)
  result = answering.run(params, EXAMPLES, jax.random.key(0))
  t = result.transcripts
  assert [x.example_id for x in t] == ["m1", "h1", "h2"]
  assert t[2].answer == "Paris" and t[2].stop_reason == "answer"  # <|im_end|> ends it and is not in the answer
  for b in (0, 1):
    row, images, _, _ = engine.prompt(EXAMPLES[b])
    ids = np.asarray([list(row.tokens)])
    inputs = {
        "input_ids": torch.from_numpy(ids),
        "mm_token_type_ids": torch.from_numpy((ids == config.image_token_id).astype(np.int64))
    }
    if images:
      image = next(iter(images.values()))
      inputs.update(pixel_values=torch.tensor(image.patches), image_grid_thw=torch.tensor(np.asarray([image.grid])))
    with torch.no_grad():
      hf_logits = torch_model(**inputs).logits[0, -1].numpy()
      # The prompt the sampler prefills (text, image cells, M-RoPE positions) gives transformers' next-token logits.
      hidden, _ = engine._prefill(params, [row], images, 128)
      logits = text.logits(params["text"], config.text, hidden)
      np.testing.assert_allclose(np.asarray(logits)[0], hf_logits, rtol=1e-4, atol=1e-4)
      ids = torch_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=[tokenizer.im_end_id,
                                               tokenizer.end_of_text_id], pad_token_id=tokenizer.end_of_text_id)
    expected = tokenizer.decode(ids[0, len(row.tokens):].tolist(), skip_special_tokens=True)
    assert t[b].answer == expected and len(ids[0]) > len(row.tokens), b
  items = [{"pred_answer": x.answer, "gt": ex["answers"]} for x, ex in zip(t, EXAMPLES)]
  scores = stream.score_items(items, "multihop_demo")
  assert scores["all"]["count"] == 3 and scores["all"]["f1"] >= 100.0 / 3  # the scripted "Paris" scores 1


def test_one_sample_per_example(setup):
  with pytest.raises(ValueError, match="direct-answer baselines take one sample"):
    setup[-1].run(setup[1], EXAMPLES[:1], jax.random.key(0), num_samples=2)


def test_eval_prompt_direct_runs_the_benchmark_loop_on_the_demo(tmp_path):
  """`--config.mode=eval --config.eval.prompt=direct`: the baseline's predictions and scores, from the same loop."""
  import json

  from experiments import search
  from varft import evaluate
  config = search.get_config("demo")
  config.mode = "eval"
  config.eval.prompt = "direct"
  config.eval.direct_max_new_tokens = 4
  config.eval.benchmarks = ("mat_search", "multihop_demo")
  config.eval.num_prompts = 2
  metrics = evaluate.run(config, str(tmp_path))
  assert 0.0 <= metrics["eval/mat_search/f1"] <= 100.0 and metrics["eval/multihop_demo/answered"] == 1.0
  items = json.loads((tmp_path / "eval" / "step_000000" / "mat_search.json").read_text())
  assert len(items) == 2 and all(isinstance(i["pred_answer"], str) for i in items)
  assert "The answer should be very brief." in items[0]["trajectory"] and "<query>" not in items[0]["trajectory"]
  text_only = json.loads((tmp_path / "eval" / "step_000000" / "multihop_demo.json").read_text())
  assert "\nOnly Return the answer." in text_only[0]["trajectory"]
  config.eval.prompt = "cot"
  with pytest.raises(ValueError, match="config.eval.prompt='cot' is not one of"):
    evaluate.run(config, str(tmp_path / "other"))


def test_a_prompt_over_the_length_buckets_is_skipped_not_fatal(setup):
  _, params, _, _, engine = setup
  long = {"id": "long", "question": "why " * 300, "answers": ["x"], "images": []}
  result = engine.run(params, [long, EXAMPLES[1]], jax.random.key(0))
  assert [t.example_id for t in result.transcripts] == ["h1"] and result.stats["skipped"] == 1


def test_repetition_penalty_replies_equal_transformers_generate(setup):
  """The checkpoint generation config's penalty (1.05 in the paper; 1.3 here so that it changes tokens) over the
  prompt and the reply, as transformers' `generate(repetition_penalty=...)`."""
  config, params, torch_model, tokenizer, engine = setup
  penalised = direct.DirectAnswerEngine(config, tokenizer, dataclasses.replace(engine.config, repetition_penalty=1.3),
                                        max_new_tokens=NEW_TOKENS)
  result = penalised.run(params, EXAMPLES[1:], jax.random.key(0))
  plain = engine.run(params, EXAMPLES[1:], jax.random.key(0))
  for b, example in enumerate(EXAMPLES[1:]):
    row, *_ = penalised.prompt(example)
    with torch.no_grad():
      ids = torch_model.generate(torch.tensor([list(row.tokens)]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 repetition_penalty=1.3, eos_token_id=[tokenizer.im_end_id, tokenizer.end_of_text_id],
                                 pad_token_id=tokenizer.end_of_text_id)
    expected = tokenizer.decode(ids[0, len(row.tokens):].tolist(), skip_special_tokens=True)
    assert result.transcripts[b].answer == expected, b
  assert [t.answer for t in result.transcripts] != [t.answer for t in plain.transcripts]
