"""The notebooks of experiments/ run end to end at the smoke size: every cell, one kernel each.

The kernel inherits the environment: `EMBEDSPACE_NOTEBOOK_SIZE=smoke` shrinks every run to the
configs' `:smoke` variants, `EMBEDSPACE_NOTEBOOK_RUNS` sends the runs to `tmp_path`, and the
variables that point a notebook at already-trained workdirs are removed, so each notebook trains
what it measures; the one exception is the ImageBind encoders of notebooks 03 and 04, which come
from the tests' shared `:smoke` run (notebook 03 still trains CLIP, ImageBind `:direct` and DeCUR
through the same code path). A cell that raises fails the test with the cell's traceback.
"""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXPERIMENTS, "*.ipynb")))
WORKDIR_VARIABLES = ("EMBEDSPACE_VICREG_WORKDIR", "EMBEDSPACE_CLIP_WORKDIR",
                     "EMBEDSPACE_IMAGEBIND_WORKDIR", "EMBEDSPACE_IMAGEBIND_DIRECT_WORKDIR",
                     "EMBEDSPACE_DECUR_WORKDIR", "EMBEDSPACE_PALME_WORKDIR",
                     "EMBEDSPACE_FIND_WORKDIR")


def test_the_four_notebooks_are_there():
  assert NOTEBOOKS == ["01_distance_measures.ipynb", "02_train_vicreg_simclr.ipynb",
                       "03_multimodal_binding.ipynb", "04_interfaces.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_at_smoke_size(name, tmp_path, monkeypatch, request):
  nb = nbformat.read(os.path.join(EXPERIMENTS, name), as_version=4)
  assert "parameters" in nb.cells[3].metadata.get("tags", []), "cell 4 must be the parameters"
  monkeypatch.setenv("EMBEDSPACE_NOTEBOOK_SIZE", "smoke")
  monkeypatch.setenv("EMBEDSPACE_NOTEBOOK_RUNS", str(tmp_path / "runs"))
  for variable in WORKDIR_VARIABLES:
    monkeypatch.delenv(variable, raising=False)
  if name.startswith(("03", "04")):
    monkeypatch.setenv("EMBEDSPACE_IMAGEBIND_WORKDIR",
                       request.getfixturevalue("imagebind_smoke_workdir"))
  # One CPU device in the kernel: the smoke runs are faster unsharded (the sharded step on 8
  # devices is tested in test_train.py and test_multimodal.py).
  flags = os.environ.get("XLA_FLAGS", "").split()
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      f for f in flags if not f.startswith("--xla_force_host_platform_device_count")))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": EXPERIMENTS}})
  client.execute()  # raises CellExecutionError, naming the cell, on the first error
  errors = [out for cell in nb.cells for out in cell.get("outputs", [])
            if out.get("output_type") == "error"]
  assert not errors
  assert "SIZE=smoke" in "".join(out.get("text", "") for out in nb.cells[4].outputs)
