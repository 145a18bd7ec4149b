"""Launch scripts: syntax, usage, argument errors, the commands they run (fake gcloud/srun)."""
import os
import shutil
import stat
import subprocess
import tarfile

import pytest

LAUNCH = os.path.join(os.path.dirname(__file__), '..', '..', 'launch')
SCRIPTS = ('single_host.sh', 'tpu_pod.sh', 'slurm_gpu.sh')
REQUIRED = {
    'single_host.sh': ['--config', 'c.py', '--workdir', '/w'],
    'tpu_pod.sh': ['--tpu', 't', '--zone', 'z', '--config', 'c.py', '--workdir', 'gs://b/w'],
    'slurm_gpu.sh': ['--nodes', '2', '--config', 'c.py', '--workdir', '/w'],
}


def _run(script, args, env=None, launch_dir=LAUNCH):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  full_env.update(env or {})
  return subprocess.run(['bash', os.path.join(launch_dir, script), *args], capture_output=True, text=True, env=full_env,
                        timeout=30)


def _fake(tmp_path, name, body):
  """An executable on PATH that logs its arguments (one per line) and runs `body`."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text('#!/usr/bin/env bash\n'
                  f'{{ echo "== {name}"; printf "%s\\n" "$@"; }} >> {tmp_path}/calls.log\n' + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return {'PATH': f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize('script', SCRIPTS)
def test_syntax_and_help(script):
  assert subprocess.run(['bash', '-n', os.path.join(LAUNCH, script)]).returncode == 0
  out = _run(script, ['--help'])
  assert out.returncode == 0 and 'Usage' in out.stdout and '--config' in out.stdout


@pytest.mark.parametrize('script', SCRIPTS)
def test_each_missing_required_argument_is_named(script):
  args = REQUIRED[script]
  for i in range(0, len(args), 2):
    partial = args[:i] + args[i + 2:]
    out = _run(script, partial)
    assert out.returncode != 0, (script, partial)
    assert f'missing {args[i]}' in out.stderr and 'Usage' in out.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_unknown_argument_and_missing_value_fail(script):
  out = _run(script, REQUIRED[script] + ['--bogus'])
  assert out.returncode != 0 and 'unknown argument: --bogus' in out.stderr
  out = _run(script, ['--workdir'])
  assert out.returncode != 0 and '--workdir needs a value' in out.stderr


def test_single_host_dry_run_and_real_run(tmp_path):
  out = _run('single_host.sh', REQUIRED['single_host.sh'] + ['--dry-run', '--', '--config.mode=eval'])
  assert out.returncode == 0
  assert out.stdout.split() == ['python3', '-m', 'varft.main', '--config=c.py', '--workdir=/w', '--config.mode=eval']
  # The fake interpreter names one optional part, accepts its install and the check, and fails the run with 7.
  env = _fake(tmp_path, 'fakepython',
              ('case "$*" in *--action=requirements*) echo "--no-deps some-part" ;; *--action=check*|*pip*) ;;\n'
               '  *) exit 7 ;; esac\n'))
  workdir = tmp_path / 'work dir'
  out = _run('single_host.sh', [
      '--python', 'fakepython', '--config', 'experiments/x.py:demo', '--workdir',
      str(workdir), '--', '--config.seed=1'
  ], env)
  assert out.returncode == 7 and workdir.is_dir()  # the interpreter's status comes back
  calls = [c.splitlines() for c in (tmp_path / 'calls.log').read_text().split('== fakepython\n')[1:]]
  assert calls == [['-m', 'varft.main', '--action=requirements', '--config=experiments/x.py:demo', '--config.seed=1'],
                   ['-m', 'pip', 'install', '-q', '--no-deps', 'some-part'],
                   ['-m', 'varft.main', '--action=check', '--config=experiments/x.py:demo', '--config.seed=1'],
                   ['-m', 'varft.main', '--config=experiments/x.py:demo', f'--workdir={workdir}', '--config.seed=1']]


def test_tpu_pod_runs_every_step_on_all_workers(tmp_path):
  # The run step (`ssh ... python3 -m varft.main`) fails with 3: logs are still copied back.
  env = _fake(tmp_path, 'gcloud', 'if [[ "$*" == *config.distributed=True* ]]; then exit 3; fi\n')
  logs = tmp_path / 'logs'
  # A copy of the script in a tiny repo, so --setup packs that instead of the real tree.
  repo = tmp_path / 'repo'
  (repo / 'launch').mkdir(parents=True)
  shutil.copy(os.path.join(LAUNCH, 'tpu_pod.sh'), repo / 'launch' / 'tpu_pod.sh')
  (repo / 'setup.py').write_text('# stand-in\n')
  out = _run(
      'tpu_pod.sh', REQUIRED['tpu_pod.sh'] + [
          '--create', '--accelerator', 'v4-32', '--version', 'tpu-ubuntu2204-base', '--setup', '--delete', '--logs',
          str(logs), '--project', 'p1', '--', '--config.mode=eval'
      ], {
          **env, 'TMPDIR': str(tmp_path)
      }, launch_dir=str(repo / 'launch'))
  assert out.returncode == 3, out.stderr
  calls = (tmp_path / 'calls.log').read_text().split('== gcloud\n')[1:]
  verbs = [c.splitlines()[3] for c in calls]
  assert verbs == ['create', 'scp', 'ssh', 'ssh', 'scp', 'delete']
  assert all('--zone=z' in c and '--project=p1' in c for c in calls)
  assert '--accelerator-type=v4-32' in calls[0] and '--version=tpu-ubuntu2204-base' in calls[0]
  assert all('--worker=all' in calls[i] for i in (1, 2, 3, 4))
  setup, run = calls[2], calls[3]
  assert 'python3 -m varft.main --action=requirements --config=c.py --config.mode=eval' in setup
  assert 'pip install -q $args' in setup
  assert ('python3 -m varft.main --action=check --config=c.py --config.mode=eval && python3 -m varft.main '
          '--config=c.py --workdir=gs://b/w --config.distributed=True --config.mode=eval') in run
  assert 'pipefail' in run and logs.is_dir()
  with tarfile.open(tmp_path / 'varft_src_t.tar.gz') as tar:
    assert './setup.py' in tar.getnames()


def test_tpu_pod_create_needs_accelerator_and_version():
  out = _run('tpu_pod.sh', REQUIRED['tpu_pod.sh'] + ['--create', '--version', 'v'])
  assert out.returncode != 0 and '--create needs --accelerator' in out.stderr


def test_tpu_pod_dry_run_prints_without_running(tmp_path):
  env = _fake(tmp_path, 'gcloud', 'exit 0\n')
  out = _run('tpu_pod.sh', REQUIRED['tpu_pod.sh'] + ['--dry-run'], env)
  assert out.returncode == 0 and not (tmp_path / 'calls.log').exists()
  assert 'gcloud compute tpus tpu-vm ssh t --zone=z --worker=all' in out.stdout


def test_slurm_submits_itself_without_dry_run_flag(tmp_path):
  env = _fake(tmp_path, 'sbatch', 'exit 0\n')
  _fake(tmp_path, 'fakepython', 'exit 0\n')  # the login node's requirements and start-up check pass
  out = _run(
      'slurm_gpu.sh', REQUIRED['slurm_gpu.sh'] +
      ['--workdir',
       str(tmp_path / 'w'), '--partition', 'gpu', '--python', 'fakepython', '--', '--config.mode=eval'], env)
  assert out.returncode == 0, out.stderr
  log = (tmp_path / 'calls.log').read_text()
  assert '--action=check' in log.split('== sbatch')[0]
  args = log.split('== sbatch\n')[1].splitlines()
  assert '--nodes=2' in args and '--ntasks-per-node=1' in args and '--gpus-per-node=8' in args
  assert '--partition=gpu' in args and args[-2:] == ['--', '--config.mode=eval']
  assert args[args.index('--config') + 1] == 'c.py' and '--dry-run' not in args
  assert any(a.startswith('--export=ALL,VARFT_REPO=') for a in args)
  assert (tmp_path / 'w' / 'slurm_logs').is_dir()


def test_slurm_inside_allocation_sets_jax_distributed_env(tmp_path):
  # Fake srun: record the coordinator env, then run the task as process 1 of 2.
  env = _fake(tmp_path, 'srun',
              ('echo "COORD=$JAX_COORDINATOR_ADDRESS N=$JAX_NUM_PROCESSES" >> ' + f'{tmp_path}/calls.log\n'
               'SLURM_PROCID=1 "${@: -3}"\n'))
  _fake(tmp_path, 'fakepython', f'echo "PID=$JAX_PROCESS_ID" >> {tmp_path}/calls.log\n')
  out = _run('slurm_gpu.sh', ['--config', 'c.py', '--workdir', '/w', '--port', '4000', '--python', 'fakepython'], {
      **env, 'SLURM_JOB_ID': '9',
      'SLURM_JOB_NODELIST': 'node7,node8',
      'SLURM_NNODES': '2'
  })
  assert out.returncode == 0, out.stderr
  log = (tmp_path / 'calls.log').read_text()
  assert 'COORD=node7:4000 N=2' in log and 'PID=1' in log
  assert '--nodes=2\n--ntasks-per-node=1' in log
  assert '-m\nvarft.main\n--config=c.py\n--workdir=/w' in log
