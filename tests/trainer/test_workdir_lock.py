"""One run per workdir (flock held by process 0) and recipe fingerprints checked on resume."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from experiments import echo
from varft import checkpoint as ckpt_lib
from varft import evaluate, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def holder(tmp_path):
  """Starts another process that takes the lock of a workdir and keeps it until killed."""
  procs = []

  def start(workdir):
    code = textwrap.dedent(f"""
        import sys, time
        from varft import checkpoint
        lock = checkpoint.WorkdirLock({str(workdir)!r})
        print("locked", flush=True)
        time.sleep(600)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout.readline().strip() == "locked"
    return proc

  yield start
  for proc in procs:
    proc.kill()
    proc.wait()


def _no_weights(*args, **kwargs):
  raise AssertionError("weights were loaded before the workdir checks")


def _echo(steps=2, **overrides):
  config = echo.get_config()
  config.total_steps = steps
  config.checkpoint_every = 1
  config.eval_every = 0
  config.samples_every = 0
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def test_second_trainer_on_a_locked_workdir_fails_at_once_and_sigkill_frees_it(tmp_path, holder, monkeypatch):
  workdir = tmp_path / "run"
  proc = holder(workdir)
  monkeypatch.setattr(train, "load_params", _no_weights)
  with pytest.raises(ckpt_lib.RunFolderError) as info:
    train.setup(_echo(), str(workdir))
  message = str(info.value)
  assert "\n" not in message
  assert f"workdir {workdir} is in use by another run (pid {proc.pid} on " in message
  # Evaluating a running run's checkpoints takes no lock.
  with pytest.raises(AssertionError, match="weights were loaded"):
    evaluate.run(_echo(mode="eval"), str(workdir))

  proc.send_signal(signal.SIGKILL)
  proc.wait()
  lock = ckpt_lib.WorkdirLock(str(workdir))  # the kernel dropped the dead holder's lock: nothing stale to clean
  assert open(lock.path).read() == f"pid {os.getpid()} on {os.uname().nodename}\n"
  with pytest.raises(ckpt_lib.RunFolderError, match=f"pid {os.getpid()} "):
    ckpt_lib.WorkdirLock(str(workdir))  # a second lock, even from the same process
  lock.release()
  ckpt_lib.WorkdirLock(str(workdir)).release()


def test_the_cli_refuses_a_second_run_on_a_locked_workdir(tmp_path, holder):
  workdir = tmp_path / "run"
  proc = holder(workdir)
  out = subprocess.run([sys.executable, "-m", "varft.main", "--config=experiments/echo.py", f"--workdir={workdir}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]  # one line, no traceback
  assert f"workdir {workdir} is in use by another run (pid {proc.pid} on " in lines[0]
  assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_a_finished_run_releases_its_lock(tmp_path):
  train.train(_echo(steps=1), str(tmp_path))
  ckpt_lib.WorkdirLock(str(tmp_path)).release()


def test_resume_under_another_recipe_is_refused_naming_the_keys_unless_forced(tmp_path, monkeypatch):
  train.train(_echo(steps=2), str(tmp_path))
  # Run-only keys (logging, checkpoint cadence, layout) may change on resume.
  run, state = train.setup(_echo(steps=2, log_every=2, checkpoint_every=5, keep_checkpoints=1), str(tmp_path))
  assert train.restore(run, state)["step"] == 2
  run.checkpointer.close()

  changed = _echo(steps=2, seed=3, log_every=2, **{"optim.learning_rate": 0.5})
  with monkeypatch.context() as m:
    m.setattr(train, "load_params", _no_weights)
    with pytest.raises(ckpt_lib.RunFolderError) as info:
      train.setup(changed, str(tmp_path))
  message = str(info.value)
  assert "\n" not in message and "checkpoint step 2 in" in message and "--config.resume=force" in message
  assert "optim.learning_rate: 0.003 -> 0.5" in message
  assert "seed: 0 -> 3" in message and "log_every" not in message
  ckpt_lib.WorkdirLock(str(tmp_path)).release()  # the refused trainer let go of the lock

  changed.resume = "force"
  run, state = train.setup(changed, str(tmp_path))
  assert train.restore(run, state)["step"] == 2
  run.checkpointer.close()


def test_checkpoints_store_the_fingerprint_and_old_ones_are_checked_through_their_config(tmp_path):
  state = {"w": jnp.ones((2,))}
  config = _echo()
  fp = ckpt_lib.fingerprint(config)
  new = ckpt_lib.Checkpointer(str(tmp_path / "new"), async_save=False, fingerprint=fp)
  new.save(1, state, meta={"step": 1})
  _, _, _, meta = new.restore(ckpt_lib.abstract_like(state))
  new.close()
  assert meta["fingerprint"] == fp and fp["recipe"]["optim.learning_rate"] == config.optim.learning_rate

  old = ckpt_lib.Checkpointer(str(tmp_path / "old"), async_save=False)  # a checkpoint made before fingerprints
  old.save(1, state, meta={"step": 1, "config": config.to_json_best_effort()})
  old.close()
  ckpt_lib.Checkpointer(str(tmp_path / "old"), fingerprint=fp).close()
  other = ckpt_lib.fingerprint(_echo(**{"grpo.beta": 0.5}))
  with pytest.raises(ckpt_lib.RunFolderError, match=r"grpo\.beta: 0\.0 -> 0\.5"):
    ckpt_lib.Checkpointer(str(tmp_path / "old"), fingerprint=other)
  lock = ckpt_lib.WorkdirLock(str(tmp_path))
  with pytest.raises(ValueError, match=r"config\.resume='always' is not one of"):
    ckpt_lib.Checkpointer(str(tmp_path / "old"), fingerprint=other, resume="always", lock=lock)
  ckpt_lib.WorkdirLock(str(tmp_path)).release()  # a checkpointer that failed to start let go of the lock


def test_recipe_keeps_what_changes_the_run_and_drops_run_only_keys():
  config = _echo()
  keys = ckpt_lib.recipe(config)
  for key in ("seed", "total_steps", "optim.learning_rate", "grpo.beta", "rollout.num_samples", "rewards", "model.name",
              "data.train", "task"):
    assert key in keys, key
  for key in ("log_every", "checkpoint_every", "resume", "mode", "mesh.fsdp", "grpo.micro_batches",
              "rollout.length_buckets", "data.mat_dir", "tools.max_workers", "eval.batch_size"):
    assert key not in keys, key
  # Tuples and lists are the same JSON value: a config read back from a checkpoint fingerprints the same.
  assert ckpt_lib.fingerprint(config) == ckpt_lib.fingerprint(json.loads(config.to_json_best_effort()))
  assert ckpt_lib.recipe_changes({
      "a": 1,
      "b": 2,
      "log_every": 1
  }, {
      "a": 1,
      "c": 3,
      "log_every": 5
  }) == ["b: 2 -> '<absent>'", "c: '<absent>' -> 3"]


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
  import errno
  import fcntl

  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  lock = ckpt_lib.WorkdirLock(str(tmp_path))
  assert "a second run on it would not be stopped" in caplog.text and "No locks available" in caplog.text
  lock.release()
