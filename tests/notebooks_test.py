"""The notebooks run top to bottom in their tiny setting, and are stored without outputs."""

import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, 'notebooks')
NOTEBOOKS = ('quickstart.ipynb', 'ablation_dot_vs_cat.ipynb')


def execute(name, out_dir, monkeypatch):
  """Runs every cell in a fresh python3 kernel started in notebooks/, as a user opening it."""
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  # The kernel inherits this environment: the notebooks read the first two.
  monkeypatch.setenv('DLRM_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('DLRM_NOTEBOOK_OUT', str(out_dir))
  # So does the session's compilation cache (conftest): the tiny model compiled there already.
  notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': NOTEBOOK_DIR}})
  client.execute()  # raises CellExecutionError at the first cell that fails
  return notebook


def outputs_of(notebook):
  return [output for cell in notebook.cells if cell.cell_type == 'code'
          for output in cell.get('outputs', [])]


def text_of(notebook):
  parts = []
  for output in outputs_of(notebook):
    parts.append(output.get('text', ''))
    parts.extend(str(v) for k, v in output.get('data', {}).items() if k.startswith('text/'))
  return '\n'.join(parts)


def images_in(notebook):
  return sum('image/png' in output.get('data', {}) for output in outputs_of(notebook))


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
  notebook = execute('quickstart.ipynb', tmp_path, monkeypatch)
  text = text_of(notebook)
  assert 'oracle_auc' in text and 'restored step 40' in text
  assert 'model p(click)' in text and 'mean cosine, same category' in text
  # Nothing started JAX before the trainer could apply its settings (cpu_async_dispatch).
  assert 'has no effect' not in text
  # Loss and AUC curves, then the embedding similarities.
  assert images_in(notebook) == 2
  assert os.path.exists(tmp_path / 'run' / 'results.json')


@pytest.mark.slow
def test_ablation_notebook_runs(tmp_path, monkeypatch):
  notebook = execute('ablation_dot_vs_cat.ipynb', tmp_path, monkeypatch)
  text = text_of(notebook)
  assert '| interaction_op | seeds | eval AUC |' in text
  # Both planted settings ran, each with a table, an AUC plot and a loss plot.
  for setting in ('interactions', 'no_interactions'):
    assert os.path.exists(tmp_path / setting / 'results.md')
  assert images_in(notebook) == 5  # and the two settings side by side
  assert 'dot - cat' in text


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebooks_are_stored_clean(name):
  """Outputs stay out of the repository: they are large, and stale after any code change."""
  notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None
  first_code = next(c for c in notebook.cells if c.cell_type == 'code').source
  # Installs only in Colab; a local run uses the checkout it sits in.
  assert "'google.colab' in sys.modules" in first_code and 'pip' in first_code
  assert 'colab.research.google.com' in notebook.cells[0].source  # the Open in Colab badge
