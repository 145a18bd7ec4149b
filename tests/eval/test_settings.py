"""The evaluation settings: varft's defaults unchanged, the paper setting as the released eval scripts run."""
import importlib.util
import io
import pathlib
import types

import jax
import ml_collections
import numpy as np
from PIL import Image

from varft import agent_task, defaults, rollout
from varft.eval import score, settings, stream
from varft.processing import hf_files

REPO = pathlib.Path(__file__).parents[2]


def experiment(name, arg):
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def engine_config(config):
  return agent_task.rollout_config(config.rollout, **settings.rollout_overrides(config))


def test_varft_defaults_keep_the_chat_evaluation():
  config = experiment("search", "7b")
  got = engine_config(config)
  want = agent_task.rollout_config(config.rollout, mode="multiturn", temperature=config.eval.temperature,
                                   max_turns=config.eval.max_turns)
  assert got == want
  assert (got.layout, got.agent_rules, got.stop_at, got.repetition_penalty) == ("chat", "varft", "closing_tag", 1.0)
  assert settings.eval_resize(config) == 720  # the training inputs' square, as before
  assert config.tools.search.name == "bm25" and config.tools.search_format == "paper"


def test_paper_search_evaluation_is_the_released_script():
  config = experiment("search", "7b,paper")
  got = engine_config(config)
  assert (got.layout, got.agent_rules, got.stop_at) == ("single_turn", "paper", "eos")
  assert (got.temperature, got.repetition_penalty, got.max_new_tokens, got.max_turns) == (0.0, 1.05, 2048, 5)
  assert got.image_prefit and not got.crop_override
  assert got.max_total_tokens == 16384 and got.length_buckets == (256, 512, 1024, 2048, 4096, 8192, 16384)
  assert settings.eval_resize(config) == 0  # aspect ratio kept
  assert config.tools.search.name == "serper" and config.tools.topk == 4
  assert config.tools.search_format == "paper_exact"
  record = settings.describe(config, types.SimpleNamespace(name="serper"))
  assert record["search_backend"] == "serper" and record["layout"] == "single_turn"


def test_paper_coding_evaluation_overrides_crops_and_uses_the_checkpoint_processor(tmp_path):
  config = experiment("coding", "7b,paper")
  got = engine_config(config)
  assert got.max_new_tokens == 1024 and got.crop_override and got.agent_rules == "paper"
  assert got.image_max_pixels == config.rollout.image_max_pixels  # no checkpoint folder: the rollout's
  hf_files.write_tokenizer_and_processor(str(tmp_path), min_pixels=3136, max_pixels=12845056)
  config.model.hf_dir = str(tmp_path)
  got = engine_config(config)
  assert (got.image_min_pixels, got.image_max_pixels) == (3136, 12845056)
  assert max(got.patch_buckets) >= 12845056 // 196
  # The sandbox hands output images back as large as the evaluation shows them.
  assert agent_task.tool_executor_config(config, {}, str(tmp_path))["code"]["observe_max_pixels"] == 12845056
  plain = experiment("coding", "7b")
  assert agent_task.tool_executor_config(plain, {}, str(tmp_path))["code"]["observe_max_pixels"] == 401408
  assert settings.describe(config, None)["search_backend"] is None


def test_demo_configs_are_untouched_by_the_paper_evaluation():
  assert engine_config(experiment("search", "demo")) == engine_config(experiment("search", "demo,paper"))


def _png(width, height):
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


class SeeingEngine:
  """Records the image sizes it is given; answers nothing."""

  def __init__(self):
    self.sizes = []

  def run(self, params, examples, rng, num_samples=1):
    self.sizes += [Image.open(io.BytesIO(ex["images"][0])).size for ex in examples]
    return types.SimpleNamespace(transcripts=[])


def test_evaluation_images_keep_their_aspect_ratio_in_the_paper_setting(tmp_path):
  source = [{"id": "a", "question": "q", "answers": ["x"], "images": [_png(300, 120)]}]
  for resize, size in ((-1, (720, 720)), (0, (300, 120))):
    config = ml_collections.ConfigDict({
        "eval": {
            "num_prompts": 0,
            "batch_size": 2,
            "resize": resize
        },
        "data": {
            "resize": 720
        }
    })
    record = {
        "search_backend": "serper",
        "search_topk": 4,
        "search_format": "paper_exact",
        "layout": "single_turn",
        "agent_rules": "paper",
        "stop_at": "eos",
        "repetition_penalty": 1.05
    }
    engine = SeeingEngine()
    env = types.SimpleNamespace(config=config, eval_engine=engine, eval_settings=record)
    metrics = stream.evaluate_source(env, "mat_search", source, None, jax.random.key(0), str(tmp_path))
    assert engine.sizes == [size] and metrics["eval/mat_search/answered"] == 0.0
  table = (tmp_path / "mat_search_scores.txt").read_text()
  assert "search backend: serper (top 4, paper_exact); layout single_turn, rules paper" in table
  assert "repetition penalty 1.05, crop overrides 0" in table


def test_base_config_has_every_eval_key_the_engine_reads():
  c = defaults.base_config()
  assert set(settings.ENGINE_KEYS) <= set(c.eval.keys()) and set(settings.ENGINE_KEYS) <= set(c.rollout.keys())
  rollout.RolloutConfig(**{k: c.rollout[k] for k in settings.ENGINE_KEYS})
  assert score.format_table({"name": "x", "num_missing": 0, "all": {"f1": 1.0, "em": 1.0, "count": 1}}).count("\n") == 2
