"""The paper eval setting of the rollout engine against the released Visual-ARFT eval scripts' layout.

Expected prompts are written here from the released scripts' rules (evaluation_mat_search_ngpu_7b_visual_arft.py,
evaluation_mat_coding_visual_arft.py): one user message per turn, `[image, text]` through the Qwen2.5-VL chat
template (default system turn, generation prompt), the text grown by `'\\n' + turn` (+ `'\\n' + observation`), the
turn decoded without special tokens, search results as `'<information> ' + '1. Content:...2. Content:...' +
' </information> '`, coding's first prompt `{agent}<query> {q} <query>`, the tip after a problem step, the output
image replacing the prompt image, a crop step's slices replaced by the question's box in pixels. Images are resized
by qwen-vl-utils (multiples of 28) and then by the processor (401408 pixels at most), aspect ratio kept.
"""
import io

import jax
import numpy as np
from PIL import Image
import pytest

from tests.rollout import scripted
from varft import prompts, rollout
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model
from varft.processing import chat
from varft.tools import code as code_lib
from varft.tools import search as search_lib
from varft.tools.executor import ToolExecutor

TEMPLATE_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
TEMPLATE_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
SNIPPETS = ["Acme was founded by Ada Lovelace in 1843.", "Ada Lovelace, mathematician."]
SEARCH_TURN = "<think> The logo is Acme's. </think>\n<search> founder of Acme </search>"
PROBLEM_TURN = "<think> The digits are small. </think>\n<problem> {'crop'} </problem>"
CODE_TURN = ("<think> Crop the box. </think>\n<code>\n```python\nimport cv2\n"
             "img = cv2.imread('path_to_input_image.jpg')\nout = img[10:20, 30:40]\n"
             "cv2.imwrite('path_to_output_image.jpg', out)\n```\n</code>")
CODING_QUESTION = "What is the number in the box [100, 200, 500, 600]?"
# 140x100 -> qwen-vl-utils 140x112 -> processor 140x112: a (1, 8, 10) grid, 20 merged tokens. 150x100 -> 140x112
# as well; the 84x56 output image -> (1, 4, 6), 6 tokens.
IMAGE_TOKENS = {(140, 100): 20, (150, 100): 20, (84, 56): 6}


def _png(width, height, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


class Snippets(search_lib.SearchBackend):
  name = "serper"

  def __init__(self, fail=False):
    self.fail, self.queries = fail, []

  def search(self, queries, k):
    self.queries += list(queries)
    if self.fail:
      raise search_lib.SearchError("search service unavailable after 4 attempts: HTTP 500")
    return [[search_lib.Doc(str(i), "Title", s) for i, s in enumerate(SNIPPETS[:k])] for _ in queries]


class Sandbox:
  """Records the programs; writes an 84x56 output image, or fails on `fail()`."""

  def __init__(self):
    self.programs = []

  def run(self, program, images=None, timeout_s=None):
    self.programs.append((program, images["path_to_input_image.jpg"].size))
    if "fail()" in program:
      return code_lib.CodeResult(False, "", "NameError", None, "NameError: name 'fail' is not defined", 0.0)
    return code_lib.CodeResult(True, "printed text", "", Image.new("RGB", (84, 56), (9, 9, 9)), None, 0.0)


def paper_config(**overrides):
  values = dict(mode="multiturn", max_turns=5, max_new_tokens=96, max_total_tokens=1536, max_tool_output_tokens=512,
                temperature=0.0, length_buckets=(1536,), chunk_buckets=(128,), patch_buckets=(2048,),
                image_min_pixels=3136, image_max_pixels=401408, layout="single_turn", agent_rules="paper",
                stop_at="eos", repetition_penalty=1.05, crop_override=True, image_prefit=True)
  values.update(overrides)
  return rollout.RolloutConfig(**values)


@pytest.fixture(scope="module")
def setup():
  config = config_lib.get_config("tiny")
  params = model.init_params(jax.random.PRNGKey(0), config)
  return config, params, chat.load_tokenizer()


def _run(setup, rollout_config, executor, example, turns):
  config, params, tokenizer = setup

  def script(row, turn):
    return tokenizer.encode(turns[turn - 1] + "<|im_end|>") if turn <= len(turns) else None

  engine = scripted.ScriptedEngine(config, tokenizer, executor, rollout_config, script=script)
  return engine.run(params, [example], jax.random.PRNGKey(0)), tokenizer


def _expected_ids(tokenizer, text, image_tokens):
  return tokenizer.encode(text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens))


def test_search_turn_matches_the_released_layout(setup):
  backend = Snippets()
  executor = ToolExecutor({"search_format": "paper_exact", "topk": 4}, search_backend=backend)
  example = {
      "id": 7,
      "task": "search",
      "question": "Who founded the company of this logo?",
      "answers": ["Ada Lovelace"],
      "images": [_png(140, 100, 0)]
  }
  result, tokenizer = _run(setup, paper_config(), executor, example,
                           [SEARCH_TURN, "<think> Found. </think>\n<answer> Ada Lovelace </answer>"])
  t = result.transcripts[0]
  information = ("<information> 1. Content:Acme was founded by Ada Lovelace in 1843.2. Content:Ada Lovelace, "
                 "mathematician. </information> ")
  text = (prompts.SEARCH_AGENT + "\n<query> Who founded the company of this logo? </query>\n" + SEARCH_TURN + "\n" +
          information)
  expected = TEMPLATE_HEAD + "<|vision_start|><|image_pad|><|vision_end|>" + text + TEMPLATE_TAIL
  assert [m["role"] for m in t.messages] == ["user", "assistant", "user", "assistant"]
  assert t.messages[0]["text"] == (TEMPLATE_HEAD + "<|vision_start|><|image_pad|><|vision_end|>" +
                                   prompts.SEARCH_AGENT + "\n<query> Who founded the company of this logo? </query>" +
                                   TEMPLATE_TAIL)
  assert t.messages[2]["text"] == expected and t.messages[2]["images"] == ["prompt:0"]
  ids = _expected_ids(tokenizer, expected, IMAGE_TOKENS[(140, 100)])
  assert result.batch["tokens"][0][:len(ids)].tolist() == ids  # the ledger: the last turn's prompt, then its sample
  assert result.batch["loss_mask"][0][:len(ids)].sum() == 0
  assert backend.queries == ["founder of Acme"]
  assert t.answer == "Ada Lovelace" and t.stop_reason == "answer"
  # Generated to EOS: the ledger holds <|im_end|> as a sampled token, the scored completion is without it.
  assert t.messages[-1]["text"].endswith("</answer><|im_end|>")
  assert t.completion == "<think> Found. </think>\n<answer> Ada Lovelace </answer>"
  assert result.batch["tokens"][0][len(ids) + len(tokenizer.encode(t.completion))] == tokenizer.im_end_id
  assert result.batch["loss_mask"][0][len(ids):].sum() == len(tokenizer.encode(t.completion)) + 1


def test_coding_turns_match_the_released_layout(setup):
  sandbox = Sandbox()
  executor = ToolExecutor({}, sandbox=sandbox)
  example = {"id": 3, "task": "coding", "question": CODING_QUESTION, "answers": ["42"], "images": [_png(150, 100, 1)]}
  result, tokenizer = _run(setup, paper_config(), executor, example,
                           [PROBLEM_TURN, CODE_TURN, "<think> It reads 42. </think>\n<answer> 42 </answer>"])
  t = result.transcripts[0]
  first = prompts.CODING_AGENT + f"<query> {CODING_QUESTION} <query>"
  assert t.messages[0]["text"] == TEMPLATE_HEAD + "<|vision_start|><|image_pad|><|vision_end|>" + first + TEMPLATE_TAIL
  tip = ("<tips> We now need to crop the image. Please provide the Python code. Use [x_min, y_min, x_max, y_max] to "
         "represent the bounding box coordinates. </tips>")
  second = first + "\n" + PROBLEM_TURN + "\n" + tip + "\n"
  assert t.messages[2]["text"] == TEMPLATE_HEAD + "<|vision_start|><|image_pad|><|vision_end|>" + second + TEMPLATE_TAIL
  # The code call ran on the original 150x100 image with the question's box in pixels: x 15..75, y 20..60.
  (program, size), = sandbox.programs
  assert size == (150, 100) and "out = img[20:60, 15:75]" in program and "[10:20, 30:40]" not in program
  # Its output image replaces the prompt image; the printed text is not shown.
  third = second + "\n" + CODE_TURN
  expected = TEMPLATE_HEAD + "<|vision_start|><|image_pad|><|vision_end|>" + third + TEMPLATE_TAIL
  assert t.messages[4]["text"] == expected and t.messages[4]["images"] == ["turn2:output"]
  ids = _expected_ids(tokenizer, expected, IMAGE_TOKENS[(84, 56)])
  assert result.batch["tokens"][0][:len(ids)].tolist() == ids
  assert t.answer == "42" and result.stats["crop_overrides"] == 1
  assert t.observations[1]["crop_override"] is True


def test_a_search_error_ends_the_item_without_prediction(setup):
  executor = ToolExecutor({"search_format": "paper_exact"}, search_backend=Snippets(fail=True))
  example = {"id": 1, "task": "search", "question": "Who?", "answers": ["x"], "images": [_png(140, 100, 0)]}
  for layout in ("single_turn", "chat"):
    result, _ = _run(setup, paper_config(layout=layout), executor, example, [SEARCH_TURN, "<answer> x </answer>"])
    t = result.transcripts[0]
    assert t.stop_reason == "tool_error" and t.answer is None and len(t.messages) == 2
  varft_rules, _ = _run(setup, paper_config(agent_rules="varft", layout="chat"), executor, example,
                        [SEARCH_TURN, "<answer> x </answer>"])
  assert varft_rules.transcripts[0].answer == "x"  # varft's rules show the error and go on
  assert "search service unavailable" in varft_rules.transcripts[0].messages[2]["text"]


def test_a_failed_code_call_adds_only_the_turn(setup):
  sandbox = Sandbox()
  example = {"id": 4, "task": "coding", "question": "What is written?", "answers": ["7"], "images": [_png(150, 100, 2)]}
  failing = CODE_TURN.replace("out = img[10:20, 30:40]", "fail()")
  problem = "<problem> {'rotation90'} </problem>"
  result, _ = _run(setup, paper_config(), ToolExecutor({}, sandbox=sandbox), example,
                   [problem, failing, "<answer> 7 </answer>"])
  t = result.transcripts[0]
  assert [o["ok"] for o in t.observations] == [True, False] and t.observations[1]["crop_override"] is False
  tip = prompts.problem_tip(["rotation90"])
  assert t.messages[4]["text"].endswith(f"<query> What is written? <query>\n{problem}\n{tip}\n\n{failing}" +
                                        TEMPLATE_TAIL)
  assert t.messages[4]["images"] == ["prompt:0"] and "NameError" not in t.messages[4]["text"]


def test_single_turn_layout_with_varft_rules_and_closing_tags(setup):
  executor = ToolExecutor({}, search_backend=Snippets())
  example = {"id": 2, "task": "search", "question": "Who?", "answers": ["Ada"], "images": []}
  config = paper_config(agent_rules="varft", stop_at="closing_tag", repetition_penalty=1.0, image_prefit=False)
  result, _ = _run(setup, config, executor, example, [SEARCH_TURN + " trailing", "<answer> Ada </answer>"])
  t = result.transcripts[0]
  observation = search_lib.format_results([search_lib.Doc(str(i), "Title", s) for i, s in enumerate(SNIPPETS)])
  assert t.messages[2]["text"] == (TEMPLATE_HEAD + prompts.user_text(prompts.SEARCH_AGENT, "Who?") + "\n" +
                                   SEARCH_TURN + "\n" + observation + TEMPLATE_TAIL)
  assert t.answer == "Ada"


def test_config_rejects_unknown_settings():
  for key, value in (("layout", "tree"), ("agent_rules", "r1"), ("stop_at", "newline"), ("repetition_penalty", 0)):
    with pytest.raises(ValueError, match=key):
      paper_config(**{key: value})


def test_stepwise_training_generates_to_eos(setup):
  example = {
      "id": 5,
      "task": "search",
      "question": "Who?",
      "answers": ["Ada"],
      "images": [_png(140, 100, 3)],
      "context": "<think> a </think>\n<search> q </search>\n" + prompts.search_observation(["x"], exact=True)
  }
  config = paper_config(mode="stepwise", layout="chat", agent_rules="varft", repetition_penalty=1.0, temperature=1.0,
                        crop_override=False, image_prefit=False)
  result, tokenizer = _run(setup, config, ToolExecutor({}), example, [SEARCH_TURN + " and more text"])
  t = result.transcripts[0]
  assert t.stop_reason == "step" and t.completion == SEARCH_TURN + " and more text"  # not cut at </search>
  sampled = result.batch["tokens"][0][result.batch["loss_mask"][0] == 1].tolist()
  assert sampled == tokenizer.encode(SEARCH_TURN + " and more text") + [tokenizer.im_end_id]  # <|im_end|> trained
