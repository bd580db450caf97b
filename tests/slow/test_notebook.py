"""The Colab notebook cannot rot: ``experiments/colab_tpu.ipynb`` runs top to bottom on this CPU
(nbclient, a fresh IPython kernel), with its parameters set for CI the way papermill sets them:
a cell after the one tagged ``parameters`` overrides them (no install, no TPU, a tiny run)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests.slow import _xla_cache

pytestmark = pytest.mark.slow

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "colab_tpu.ipynb"
CI_PARAMETERS = "INSTALL = False\nREQUIRE_TPU = False\nSTEPS = 4\nTINY = True\n"


def test_the_colab_notebook_runs_top_to_bottom_on_a_cpu(tmp_path, monkeypatch):
    for name, value in _xla_cache.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(CI_PARAMETERS))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip

    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )  # fmt: skip
    assert "'bits_per_dim'" in outputs and "'split': 'test'" in outputs, outputs[-2000:]
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]  # fmt: skip
    assert len(images) == 2  # the samples and the loss plot
    assert (tmp_path / "runs" / "digits-tpu" / "checkpoints" / "4").is_dir()
    assert "'loss':" in outputs  # the custom loop's metrics
