"""The trainer's start-up fit check: where the devices report a memory limit, a config that cannot fit stops with
one line before any weights load; on CPU (no limit) and with plan_check=off it costs nothing."""
import pytest

from experiments import echo
from varft import plan, preflight, train


def _echo():
  config = echo.get_config()
  config.total_steps = 1
  config.eval_every = 0
  config.samples_every = 0
  config.rollout.prompts_per_host = 2
  config.rollout.max_total_tokens = 64
  config.rollout.max_new_tokens = 16
  config.rollout.length_buckets = (32, 64)
  config.rollout.chunk_buckets = (16,)
  return config


def _no_weights(*args, **kwargs):
  raise AssertionError("weights were loaded before the plan check")


def test_a_config_that_cannot_fit_fails_before_the_weights_load(tmp_path, monkeypatch):
  monkeypatch.setattr(plan, "device_memory_limit", lambda devices: 1 << 16)  # 64 KiB "HBM"
  monkeypatch.setattr(train, "load_params", _no_weights)
  with pytest.raises(plan.PlanError) as info:
    train.setup(_echo(), str(tmp_path / "run"))
  message = str(info.value)
  assert "\n" not in message and "GiB per device" in message and "grpo.micro_batches" in message
  assert isinstance(info.value, preflight.ConfigError)  # varft.main prints it as one line, exit code 2


def test_the_check_passes_where_it_fits_and_is_skipped_on_cpu_or_when_off(tmp_path, monkeypatch):
  assert plan.device_memory_limit(train.jax.devices()) is None  # CPU: nothing to check against
  assert train.setup(_echo(), str(tmp_path / "cpu"))[0].plan is None

  monkeypatch.setattr(plan, "device_memory_limit", lambda devices: 1 << 40)
  fits = train.setup(_echo(), str(tmp_path / "fits"))[0].plan
  assert {p.program for p in fits} >= {"extend", "generate", "train_step"}

  config = _echo()
  config.plan_check = "off"
  monkeypatch.setattr(plan, "check_fits", _no_weights)
  assert train.setup(config, str(tmp_path / "off"))[0].plan is None
  config.plan_check = "always"
  with pytest.raises(preflight.ConfigError, match="plan_check"):
    train.setup(config, str(tmp_path / "bad"))
