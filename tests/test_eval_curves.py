"""In-training evaluation curves: reading eval.jsonl files (with offsets and bad lines) and the plot/table."""

import json
import os

import pytest

from dsa_jax.commands.eval import parse_runs
from dsa_jax.eval.during_training import plot_curves, read_curve


def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def test_read_curve_offset_sorted_and_workdir(tmp_path):
  _write(tmp_path / "eval.jsonl", [{"step": 200, "eval_fd": 5.0}, {"step": 100, "eval_fd": 9.0}])
  rows = read_curve(str(tmp_path), offset=1000)
  assert [r["step"] for r in rows] == [1100, 1200]
  assert [r["eval_fd"] for r in rows] == [9.0, 5.0]


def test_read_curve_errors_name_file_and_line(tmp_path):
  p = tmp_path / "e.jsonl"
  p.write_text('{"step": 1}\nnot json\n')
  with pytest.raises(ValueError, match=r"e\.jsonl:2: not a JSON line"):
    read_curve(str(p))
  p.write_text('{"fd": 1}\n')
  with pytest.raises(ValueError, match=r"e\.jsonl:1: expected an object with a 'step'"):
    read_curve(str(p))
  with pytest.raises(FileNotFoundError, match="no eval.jsonl"):
    read_curve(str(tmp_path / "missing"))


def test_parse_runs():
  assert parse_runs(["a=runs/x", "b=runs/y:8000", "c=C:/odd"]) == {"a": ("runs/x", 0), "b": ("runs/y", 8000),
                                                                 "c": ("C:/odd", 0)}
  with pytest.raises(ValueError, match="LABEL=PATH"):
    parse_runs(["nolabel"])
  with pytest.raises(ValueError, match="given twice"):
    parse_runs(["a=x", "a=y"])


def test_plot_curves_writes_png_and_table(tmp_path):
  runs = {"one": [{"step": 10, "eval_fd": 50.0, "eval_agreement": 0.25, "eval_avg_steps": 32.0}],
          "two": [{"step": 20, "eval_fd": 40.0, "eval_agreement": 0.5, "eval_avg_steps": 32.0}]}
  files = plot_curves(runs, str(tmp_path / "out"), title="t")
  assert os.path.getsize(files["png"]) > 1000
  table = open(files["md"]).read().splitlines()
  assert table[2] == "| one | 10 | 50.0 | 0.250 | 32.00 |"
  assert table[3] == "| two | 20 | 40.0 | 0.500 | 32.00 |"
