"""launch/colab_sample.ipynb runs end to end on CPU (bundled digits model; the Wan section skipped by a parameter)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_sample.ipynb")


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_cpu(monkeypatch, tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  # Like papermill: a cell after the parameters cell overrides them (already installed, no widgets, no Wan).
  nb.cells.insert(i + 1, nbformat.v4.new_code_cell("INSTALL = False\nUSE_WIDGETS = False\nRUN_WAN = False\n"
                                                   "STREAM = True\nBUDGET = 1.5\nHEAD = \"dsa_jax/assets/digits_heads/remaining\""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits the environment
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  updates = []

  class Client(nbclient.NotebookClient):
    def process_message(self, msg, cell, cell_index):
      if msg["msg_type"] == "update_display_data":
        updates.append(msg["content"]["data"].get("text/html", ""))
      return super().process_message(msg, cell, cell_index)

  client = Client(nb, timeout=600, kernel_name="python3",
                  resources={"metadata": {"path": os.path.join(ROOT, "launch")}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors[0].get("evalue")
  text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "backend: cpu" in text
  assert "head: dsa_jax/assets/digits_heads/remaining (remaining target)" in text
  assert "steps per frame: [" in text
  # 1.5 steps per frame lies below the config's floor of 2: the head's 1-2 table lets frames stop after one step,
  # and its first chunk takes the table's most steps
  steps = [int(v) for v in text.split("steps per frame: [")[1].split("]")[0].split(",")]
  assert min(steps) == 1 and len(steps) == 16 and steps[:2] == [2, 2]
  assert "Wan2.1 section skipped (RUN_WAN = False" in text
  html = [o.data["text/html"] for o in outputs if o.output_type == "display_data" and "text/html" in o.get("data", {})]
  final = [h for h in html if "alt='video'" in h]
  assert final, "no video output"
  assert "src='data:image/gif;base64," in final[-1]  # the video, inline
  # Streaming: each of the 8 chunks updated the same output before the final video replaced it.
  chunk_updates = [u for u in updates if "alt='frames so far'" in u]
  assert [u.split(":")[0] for u in chunk_updates] == [f"<div>chunk {i}/8" for i in range(1, 9)]
  assert "alt='steps per frame'" in final[-1] and "src='data:image/png;base64," in final[-1]  # the plot beside it
