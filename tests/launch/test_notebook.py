"""The Colab notebook executes end to end on the embedded demo (small settings)."""
import os

import nbclient
import nbformat
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'varft_demo.ipynb')


@pytest.mark.slow
def test_notebook_runs_on_the_demo(tmp_path, monkeypatch):
  monkeypatch.setenv('VARFT_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('VARFT_NOTEBOOK_WORKDIR', str(tmp_path / 'work'))
  monkeypatch.setenv('PYTHONPATH', REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  monkeypatch.delenv('VARFT_HF_DIR', raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert not any(o.get('output_type') == 'error' for o in outputs)
  # The forced reference chain ran the real code tool and reached the answer.
  assert "tool: {'kind': 'code', 'ok': True" in text
  assert 'stop: answer | answer:' in text
  assert 'position after one batch' in text
  # Demo sheet, two logos, and the prompt + restored images of the rollouts.
  assert len(images) >= 6
  assert (tmp_path / 'work' / 'run' / 'hf' / 'config.json').exists()
