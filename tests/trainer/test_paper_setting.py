"""`experiments/{search,coding}.py:7b,paper`: the released trainers' behaviour where varft differs, and the numbers
that were already equal kept equal."""
import pytest

from experiments import coding, search


@pytest.mark.parametrize("experiment", [search, coding])
def test_paper_setting_switches_on_the_released_trainers_behaviour(experiment):
  paper, default = experiment.get_config("7b,paper"), experiment.get_config("7b")
  assert paper.grpo.policy_loss == "reinforce" and default.grpo.policy_loss == "clipped"
  assert paper.rollout.stop_at == "eos" and default.rollout.stop_at == "closing_tag"
  assert paper.reward_options.skip_special_tokens and not default.reward_options.skip_special_tokens
  coding_task = experiment is coding
  assert paper.reward_options.gold_injection == coding_task and not default.reward_options.gold_injection
  assert paper.reward_options.math_verify == (not coding_task)


@pytest.mark.parametrize("experiment", [search, coding])
def test_paper_setting_keeps_the_numbers_that_were_equal(experiment):
  c = experiment.get_config("7b,paper")
  assert (c.rollout.num_samples, c.grpo.beta, c.optim.learning_rate, c.rollout.prompts_per_host) == (8, 0.04, 1e-6, 16)
  assert (c.grpo.epochs, c.grpo.aggregation, c.grpo.advantage, c.rollout.temperature) == (1, "sequence_mean", "std",
                                                                                          1.0)
  assert (c.rollout.max_new_tokens, c.rollout.image_max_pixels, c.data.resize, c.rollout.top_k) == (256, 401408, 720,
                                                                                                    50)
  assert c.keep_checkpoint_steps == ((1400,) if experiment is coding else (200,))


def test_coding_demo_step_with_the_paper_scoring_injects_one_gt_per_group(tmp_path):
  """One GRPO step of the real pipeline (demo MAT-Training coding steps, tiny model) with gold injection, the
  paper's scoring text and the REINFORCE ratio: each prompt's group holds exactly one row scored as its gt."""
  from varft import train
  config = coding.get_config("demo,stepwise")
  config.total_steps = 1
  config.eval_every = 0
  config.samples_every = 0
  config.export_hf = False
  config.rollout.num_samples = 2
  config.rollout.max_new_tokens = 8
  config.grpo.policy_loss = "reinforce"
  config.reward_options.gold_injection = True
  config.reward_options.skip_special_tokens = True
  metrics = train.train(config, str(tmp_path))
  groups = config.rollout.prompts_per_host
  assert metrics["rollout/gold_injected"] == groups and metrics["rollout/gold_missing"] == 0
  # A tiny random policy never writes the format in 8 tokens: the injected gt rows (1 of 2 per group) are the ones
  # scored with full format.
  assert metrics["reward/format"] == 0.5


@pytest.mark.parametrize("key", ["gold_injection", "skip_special_tokens"])
def test_step_wise_scoring_options_are_refused_in_multi_turn_mode(tmp_path, key):
  from varft import train
  config = coding.get_config("demo,multiturn")
  config.reward_options[key] = True
  with pytest.raises(ValueError, match=f"config.reward_options.{key} is for step-wise training"):
    train.train(config, str(tmp_path))
