"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.faults import REPO

pytestmark = pytest.mark.engine


def test_quickstart_notebook_trains_and_plots():
    path = REPO / "examples" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError on any error in a cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "4 steps; checkpoint: " in text and "step-00000004" in text
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
