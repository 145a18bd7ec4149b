"""The rollout engine with a scripted policy (forced tokens through the real sampler) and a scripted tool executor.

Every check runs on both schedules: lock-step, and continuous with tools of different latencies (rows interleave:
one row's slow search is still out while the others go on). One run covers: search (ok, tool error, result
truncation), code with an output image, a `<problem>` hint, a malformed action, the max-turn limit, both ways of
hitting the max-token limit, and free sampling. The batch is then checked against independent computations:
positions against transformers' `get_rope_index` on the final sequences, stored log-probs against a fresh forward
pass, and the loss mask against the scripted tokens.
"""
import concurrent.futures
import dataclasses
import io
import threading
import time

import jax
import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip("torch")

from tests import hf_tiny  # noqa: E402
from tests.rollout import scripted  # noqa: E402
from varft import batch as batch_lib  # noqa: E402
from varft import prompts, rollout, sampling  # noqa: E402
from varft.models.qwen25vl import config as config_lib  # noqa: E402
from varft.models.qwen25vl import hf, model  # noqa: E402
from varft.processing import chat  # noqa: E402
from varft.tools.executor import Observation  # noqa: E402

G = 3
TOOL_TOKENS = 32
LONG_QUESTION = "Which river flows through the city in the picture, " + "and what else " * 60 + "?"


def _png(width, height, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


EXAMPLES = [
    {
        "id": "s1",
        "task": "search",
        "question": "Where is this?",
        "answers": ["Paris"],
        "images": [_png(56, 56, 0)]
    },
    {
        "id": "c1",
        "task": "coding",
        "question": "What is written?",
        "answers": ["42"],
        "images": [_png(84, 56, 1)]
    },
    {
        "id": "s2",
        "task": "search",
        "question": LONG_QUESTION,
        "answers": ["Seine"],
        "images": []
    },
]

SCRIPT = {  # (row, turn) -> forced text; rows 3*g .. 3*g+2 are the G samples of example g
    (0, 1): "<think> look it up </think>\n<search> capital of France </search>",
    (0, 2): "<think> found </think>\n<answer> Paris </answer>",
    (1, 1): "<search> broken </search>",
    (1, 2): "<think> no tag follows</think><|im_end|>",
    (2, 1): "<search> one </search>", (2, 2): "<search> two </search>", (2, 3): "<search> three </search>",
    (3, 1): "<think> upside down </think>\n<problem> {'rotation180'} </problem>",
    (3, 2): "<code>\n```python\nrotate()\n```\n</code>",
    (3, 3): "<answer> 42 </answer>",
    (4, 1): "<code>\n```python\nfail()\n```\n</code>",
    (4, 2): "<answer> 41 </answer>",
    (5, 1): "<think> hmm </think><answer> </answer>",
    (6, 1): "<search> long </search>",
    (8, 1): "<search> tiny </search>",
    (8, 2): "word " * 40,
}


class ScriptedExecutor:
  """Deterministic tools: searches answer from a table; code rotates its input image, or fails on `fail()`."""

  def __init__(self):
    self.batches = []

  def execute(self, calls):
    self.batches.append(list(calls))
    out = []
    for c in calls:
      if c.kind == "search" and c.payload == "broken":
        out.append(Observation("Error: search timed out", None, False, "search timed out", 0.0, "search", c.call_id))
      elif c.kind == "search":
        body = " ".join(["lorem"] * 300) if c.payload == "long" else f"{c.payload} is Paris."
        out.append(Observation(prompts.search_observation([body]), None, True, None, 0.0, "search", c.call_id))
      elif "fail()" in c.payload:
        trace = "Traceback (most recent call last):\n" + "  line 1, in <module>\n" * 40 + "NameError: fail"
        out.append(Observation(trace, None, False, "NameError: fail", 0.0, "code", c.call_id))
      else:
        image = c.images["path_to_input_image.jpg"]
        out.append(Observation("", image.rotate(180), True, None, 0.0, "code", c.call_id))
    return out


class DelayedExecutor(ScriptedExecutor):
  """The same tools behind `submit`, each call finishing after its own delay; row 1's first search is held until
  row 2 submitted its second one (60 s at most: a lock-step engine would wait for it). Records, for each submitted
  call, which calls had finished by then."""

  DELAYS = {"0:1": 0.2, "4:1": 0.1, "2:1": 0.05}

  def __init__(self):
    super().__init__()
    self.finished, self.submitted = set(), {}
    self.lock = threading.Lock()
    self.pool = concurrent.futures.ThreadPoolExecutor(8)
    self.gate = threading.Event()

  def submit(self, call):
    with self.lock:
      self.submitted[call.call_id] = set(self.finished)
    if call.call_id == "2:2":
      self.gate.set()

    def run():
      time.sleep(self.DELAYS.get(call.call_id, 0.0))
      if call.call_id == "1:1":
        self.gate.wait(60)
      obs = self.execute([call])[0]
      with self.lock:
        self.finished.add(call.call_id)
      return obs

    return self.pool.submit(run)


@pytest.fixture(scope="module", params=["lockstep", "continuous"])
def setup(request, tmp_path_factory):
  path, torch_model = hf_tiny.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny"), tie=True)
  config = config_lib.from_hf_config(path)
  params = hf.params_from_state_dict(torch_model.state_dict(), config)
  tokenizer = chat.load_tokenizer()
  # The longest prompt (example s2) leaves room for one short search turn but not for a long observation.
  text = prompts.user_text(prompts.SEARCH_AGENT, LONG_QUESTION)
  longest = len(chat.encode_messages(tokenizer, [{"role": "user", "content": text}]))
  rollout_config = rollout.RolloutConfig(mode="multiturn", max_turns=3, max_new_tokens=24,
                                         max_total_tokens=longest + 56, max_tool_output_tokens=TOOL_TOKENS,
                                         temperature=1.0, length_buckets=(512, 768), chunk_buckets=(32, 64, 128),
                                         patch_buckets=(256,), image_max_pixels=224 * 224, schedule=request.param)
  executor = ScriptedExecutor() if request.param == "lockstep" else DelayedExecutor()

  def script(row, turn):
    return tokenizer.encode(SCRIPT[(row, turn)]) if (row, turn) in SCRIPT else None

  engine = scripted.ScriptedEngine(config, tokenizer, executor, rollout_config, script=script)
  result = engine.run(params, EXAMPLES, jax.random.PRNGKey(0), num_samples=G)
  return config, params, torch_model, tokenizer, engine, executor, result


def test_stop_reasons_and_transcripts(setup):
  *_, tokenizer, engine, executor, result = setup
  reasons = [t.stop_reason for t in result.transcripts]
  assert reasons == [
      "answer", "malformed", "max_turns", "answer", "answer", "malformed", "max_tokens", "max_new_tokens", "max_tokens"
  ]
  t = result.transcripts
  assert [x.group_id for x in t] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert t[0].answer == "Paris" and t[0].completion.endswith("<answer> Paris </answer>")
  assert "<information> 1. Content: capital of France is Paris. </information>" in t[0].messages[2]["text"]
  assert t[0].tool_stats() == {"num_calls": 1, "num_failed": 0, "all_valid": True, "num_code_success": 0}
  assert t[1].observations[0]["ok"] is False and "search timed out" in t[1].messages[2]["text"]
  assert t[1].tool_stats()["num_failed"] == 1 and not t[1].tool_stats()["all_valid"]
  assert t[2].tool_stats()["num_calls"] == 2  # the third turn's search is past the turn limit: not run
  assert "<tips>" in t[3].messages[2]["text"] and "rotation180" in t[3].messages[2]["text"]
  assert t[3].messages[4]["images"] == ["turn2:output"] and t[3].images["turn2:output"].size == (84, 56)
  assert t[3].tool_stats() == {"num_calls": 1, "num_failed": 0, "all_valid": True, "num_code_success": 1}
  assert t[4].observations[0]["truncated"] and "tool output truncated" in t[4].messages[2]["text"]
  assert t[5].actions[0].kind == "malformed"
  assert "--- assistant ---" in t[3].render()
  calls = [c for b in executor.batches for c in b]
  assert sorted(c.call_id for c in calls) == ["0:1", "1:1", "2:1", "2:2", "3:2", "4:1", "6:1", "8:1"]
  if engine.config.schedule == "lockstep":  # one execute() per turn for the whole batch
    assert [sorted(c.call_id for c in b) for b in executor.batches] == [["0:1", "1:1", "2:1", "4:1", "6:1", "8:1"],
                                                                        ["2:2", "3:2"]]
  else:  # row 2 went on to its second search while row 1's first search was still out
    assert "1:1" not in executor.submitted["2:2"] and "2:1" in executor.submitted["2:2"]
  code_call, = [c for c in calls if c.call_id == "3:2"]  # the code tool got row 3's prompt image
  assert code_call.kind == "code" and code_call.images["path_to_input_image.jpg"].size == (84, 56)
  # Two prompt images + one tool-output image, each through the vision tower once for all G samples.
  assert result.stats["images_encoded"] == 3
  assert result.stats["tool_calls"] == 8 and result.stats["stop_reasons"]["answer"] == 3
  # One prefill per prompt: its G rows copy it (1/G of the prompt tokens of all rows).
  prompt_tokens = np.argmax(result.batch["loss_mask"] == 1, axis=1)  # every row samples: its prompt ends there
  assert result.stats["prefill_tokens"] * G == prompt_tokens.sum()
  assert 0 < result.stats["live_slot_fraction"] <= 1


def _record_program_signatures(monkeypatch) -> list[set]:
  """Wraps the sampler's jitted programs so that each call adds its signature (the program, its static arguments,
  the argument tree and every leaf's shape, dtype and weak type: what jit keys a compiled program on) to the last
  set of the returned list; append a set to start recording into it."""
  runs = [set()]

  def spy(name, program):

    def call(*args, **static):
      leaves, tree = jax.tree_util.tree_flatten(args)
      leaf_types = tuple((np.shape(x), x.dtype, getattr(x, "weak_type", False)) for x in leaves)
      runs[-1].add((name, tuple(sorted(static.items())), tree, leaf_types))
      return program(*args, **static)

    return call

  names = [name for name, value in vars(sampling).items() if any(value is p for p in sampling._PROGRAMS)]
  assert len(names) == len(sampling._PROGRAMS)
  for name in names:
    monkeypatch.setattr(sampling, name, spy(name, getattr(sampling, name)))
  return runs


def test_no_recompiles_after_warm_up(setup, monkeypatch):
  """Runs of the same buckets reuse the programs: a call compiles only for a signature no earlier call had.
  Lock-step runs in the same order every time, so its second run compiles nothing. On the continuous schedule
  rows rejoin as their tools finish, so a run under another load may group them otherwise and take a row or chunk
  bucket the first run did not use; that is the only compile it may add."""
  *_, engine, executor, result = setup
  runs = _record_program_signatures(monkeypatch)
  warm = engine.run(setup[1], EXAMPLES, jax.random.PRNGKey(5), num_samples=G)
  before = sampling.Sampler.compile_count()
  runs.append(set())
  again = engine.run(setup[1], EXAMPLES, jax.random.PRNGKey(5), num_samples=G)
  unseen = runs[1] - runs[0]
  assert sampling.Sampler.compile_count() - before <= len(unseen)
  if engine.config.schedule == "lockstep":
    assert not unseen and sampling.Sampler.compile_count() == before
  assert [t.stop_reason for t in again.transcripts] == [t.stop_reason for t in warm.transcripts]
  assert [t.stop_reason for t in again.transcripts] == [t.stop_reason for t in result.transcripts]


def test_loss_mask_holds_exactly_the_sampled_tokens(setup):
  *_, tokenizer, engine, executor, result = setup
  batch = result.batch
  for row, t in enumerate(result.transcripts):
    sampled = batch["tokens"][row][batch["loss_mask"][row] == 1].tolist()
    turns = [m["text"] for m in t.messages if m["role"] == "assistant"]
    assert tokenizer.decode(sampled) == "".join(turns)
    for turn, text in enumerate(turns, 1):
      if (row, turn) in SCRIPT:
        assert SCRIPT[(row, turn)].startswith(text)
  lengths = batch["attention_mask"].sum(1)
  assert list(lengths) == [t.num_tokens for t in result.transcripts]
  assert max(lengths) <= engine.config.max_total_tokens
  assert lengths[6] <= engine.config.max_total_tokens and result.transcripts[
      8].num_tokens == engine.config.max_total_tokens
  # Observation tokens carry no loss; a tool turn is a user turn, the assistant turn reopens after it.
  row0 = tokenizer.decode(batch["tokens"][0][:lengths[0]])
  assert "</search><|im_end|>\n<|im_start|>user\n<information>" in row0
  assert "</information><|im_end|>\n<|im_start|>assistant\n<think> found" in row0
  assert np.all(batch["loss_mask"][batch["attention_mask"] == 0] == 0)
  assert np.all(batch["sampler_logps"][batch["loss_mask"] == 0] == 0)
  np.testing.assert_array_equal(batch["group_ids"], [0, 0, 0, 1, 1, 1, 2, 2, 2])


def _row_grids(batch, vision_cfg):
  """The image grid of every image occurrence, row by row in order of appearance (transformers' convention)."""
  assert batch["image_grid_thw"].shape[0] == 1  # one device: one image table
  grids = batch["image_grid_thw"][0]
  grids = grids[np.prod(grids, axis=1) > 0]
  starts = np.asarray(batch_lib.image_starts(grids, vision_cfg)[0] + [1 << 30]) // 4
  out = []
  for row in batch["image_index"]:
    for t in np.flatnonzero(row >= 0):
      if t == 0 or row[t - 1] < 0 or row[t] != row[t - 1] + 1:
        out.append(grids[int(np.searchsorted(starts, row[t], side="right") - 1)])
  return np.stack(out)


def test_positions_equal_transformers_rope_index(setup):
  config, _, torch_model, *_, result = setup
  batch = result.batch
  ids = torch.from_numpy(batch["tokens"].astype(np.int64))
  mask = torch.from_numpy(batch["attention_mask"].astype(np.int64))
  grids = _row_grids(batch, config.vision)
  assert len(grids) == 3 + 3 + 1  # the two prompt images in G rows each, and row 3's tool output
  with torch.no_grad():
    want, _ = torch_model.model.get_rope_index(ids, (ids == config.image_token_id).long(),
                                               image_grid_thw=torch.from_numpy(grids), attention_mask=mask)
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_array_equal(batch["positions"][:, valid], want.numpy()[:, valid])


def test_stored_logps_equal_a_fresh_forward_pass(setup):
  config, params, *_, result = setup
  batch = result.batch
  image_embeds = model.encode_images(params, config, batch["pixel_values"][0], {
      k: v[0] for k, v in batch["vision_inputs"].items()
  })
  hidden, _ = model.forward_hidden(params, config, batch["tokens"], batch["positions"], batch["attention_mask"],
                                   image_embeds, batch["image_index"])
  rows, cols = np.nonzero(batch["loss_mask"][:, 1:] == 1)  # token t = cols + 1 is predicted at position cols
  assert len(rows) > 100
  logps = jax.nn.log_softmax(model.logits(params, config, hidden[rows, cols]), axis=-1)
  expected = np.take_along_axis(np.asarray(logps), batch["tokens"][rows, cols + 1][:, None], axis=-1)[:, 0]
  np.testing.assert_allclose(batch["sampler_logps"][rows, cols + 1], expected, atol=1e-4)
  assert np.all(batch["loss_mask"][:, 0] == 0)


def test_stepwise_mode_makes_one_turn_from_the_carried_context(setup):
  config, params, _, tokenizer, engine, *_ = setup
  executor = ScriptedExecutor()
  stepwise = scripted.ScriptedEngine(
      config, tokenizer, executor, dataclasses.replace(engine.config, mode="stepwise"),
      stop_table=engine.sampler.stop_table, script=lambda row, turn: tokenizer.encode("<search> again </search>")
      if row == 0 else None)
  context = "<think> earlier </think>\n<search> q </search>\n<information> 1. Content:Paris </information>"
  examples = [dict(ex, step_type="answer", context=context) for ex in EXAMPLES]
  before = sampling.Sampler.compile_count()
  result = stepwise.run(params, examples, jax.random.PRNGKey(1), num_samples=G)
  assert sampling.Sampler.compile_count() == before  # same buckets and sampling config: no new programs
  assert [t.stop_reason for t in result.transcripts] == ["step"] + ["max_new_tokens"] * 8
  assert executor.batches == []  # a step-wise sample never calls a tool
  prompt = result.transcripts[0].messages[0]["text"]
  assert prompt.endswith("<query> Where is this? </query>\n" + context + "<|im_end|>\n"
                         "<|im_start|>assistant\n")
  assert result.transcripts[0].completion == "<search> again </search>"


def test_bad_examples_are_skipped_and_counted(setup):
  config, params, _, tokenizer, engine, *_ = setup
  broken = dict(EXAMPLES[0], id="broken", images=[b"not an image"])
  answering = scripted.ScriptedEngine(config, tokenizer, ScriptedExecutor(), engine.config,
                                      stop_table=engine.sampler.stop_table,
                                      script=lambda row, turn: tokenizer.encode("<answer> x </answer>"))
  result = answering.run(params, [broken, EXAMPLES[0]], jax.random.PRNGKey(2), num_samples=1)
  assert result.stats["skipped"] == 1 and len(result.transcripts) == 1
  assert result.transcripts[0].example_id == "s1" and result.transcripts[0].group_id == 0
  with pytest.raises(ValueError, match="No example could be prompted"):
    engine.run(params, [broken], jax.random.PRNGKey(2))


def test_config_from_dict_and_errors():
  config = rollout.RolloutConfig.from_config({"max_turns": 2, "length_buckets": [4096, 8192], "mode": "stepwise"})
  assert config.max_turns == 2 and config.length_buckets == (4096, 8192)
  with pytest.raises(ValueError, match="Unknown rollout config keys \\['max_turn'\\]"):
    rollout.RolloutConfig.from_config({"max_turn": 2})
  with pytest.raises(ValueError, match="largest length bucket"):
    rollout.RolloutConfig(max_total_tokens=10000)
  with pytest.raises(ValueError, match="mode"):
    rollout.RolloutConfig(mode="chat")
