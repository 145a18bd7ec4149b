"""The end-of-run summary after a warm-up: SFT loss, GRPO's reward rise against its noise, the format at the end."""
from varft import console


def _history():
  sft = [{"step": s, "sft/nll_per_token": 12.0 - s, "sft/token_prob": 0.1 * s} for s in range(1, 11)]
  rewards = [0.2, 0.4, 0.3, 0.5, 0.9, 1.0, 1.1]
  formats = [0.5, 0.5, 0.5, 0.5, 1.0, 0.75, 0.5]
  grpo = [{
      "step": 10 + i,
      "reward/mean": r,
      "reward/format": f,
      "rollout/num_trajectories": 16.0,
      "rollout/tool_calls_per_trajectory": 1.0
  } for i, (r, f) in enumerate(zip(rewards, formats), start=1)]
  return sft + grpo


def test_phase_lines_name_the_rise_against_the_std_between_steps_and_the_last_steps_format():
  lines = console.phase_lines(_history(), sft_steps=10)
  assert "loss per token 11.000 -> 6.500 (mean of the last 10; token prob 0.55)" in lines[0]
  # first 3: 0.3 +- 0.082; last 3: 1.0 +- 0.082; pooled std 0.082, rise 0.7 = 8.6 x.
  assert "first 3 steps 0.300 +- 0.082 -> last 3 1.000 +- 0.082" in lines[1]
  assert "change +0.700 = +8.6 x their pooled std" in lines[1]
  # At the end: the last 3 steps' 48 rollouts, not the last step's 16.
  assert "last 3 GRPO steps, 48 rollouts): reward/format 0.750 (last step 0.500)" in lines[2]
  assert "tool calls per trajectory 1.00" in lines[2]


def test_phase_lines_without_enough_grpo_steps_for_two_windows_skip_the_rise():
  lines = console.phase_lines(_history()[:13], sft_steps=10)
  assert len(lines) == 2 and "GRPO mean reward" not in "".join(lines)
  assert "last 3 GRPO steps, 48 rollouts): reward/format 0.500" in lines[1]
