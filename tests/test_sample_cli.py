"""`dsa-jax sample` and `dsa-jax bench sample` on the tiny config (CPU, random weights)."""

import json
import os
import sys

import numpy as np
import pytest

from dsa_jax import cli


@pytest.fixture(scope="module")
def tiny(repo_root):
  return os.path.join(repo_root, "configs", "tiny.py")


def test_sample_writes_video_json_and_plot(tmp_path, tiny, capsys):
  out = tmp_path / "out"
  rc = cli.main(["sample", "--config", tiny, "--out", str(out), "--prompt", "A red ball, bouncing!",
                 "--threshold", "0.6", "--seed", "3"])
  assert rc == 0
  text = capsys.readouterr()
  assert "compiled in" in text.out and "RANDOM weights" in text.err
  name = "a_red_ball_bouncing"
  for ext in (".mp4", ".gif", ".steps.json", ".steps.png"):
    assert (out / (name + ext)).stat().st_size > 0, ext
  assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary files left
  rec = json.loads((out / f"{name}.steps.json").read_text())
  assert rec["prompt"] == "A red ball, bouncing!" and rec["seed"] == 3 and rec["threshold"] == 0.6
  assert len(rec["steps"]) == 6 and len(rec["confidences"]) == 6
  # The stop rule as recorded: a frame ends before max_steps only once its confidence reaches the threshold; the
  # random head says about 0.5, so here every frame takes all steps.
  assert all(s == rec["max_steps"] or c >= rec["threshold"] for s, c in zip(rec["steps"], rec["confidences"]))
  assert max(rec["confidences"]) < 0.6 and rec["steps"] == [rec["max_steps"]] * 6
  assert rec["timings"]["compile_s"] > 0 and rec["config"]["name"] == "tiny"
  import imageio.v2 as imageio
  import imageio_ffmpeg
  gen = imageio_ffmpeg.read_frames(str(out / f"{name}.mp4"))
  meta = next(gen)
  frames = list(gen)
  assert meta["size"] == (96, 64) and len(frames) == 6
  gif = imageio.mimread(str(out / f"{name}.gif"))
  assert len(gif) == 6


def test_sample_prompt_file_streaming_with_guidance(tmp_path, tiny, capsys):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("# a comment\na cat\n\na dog\na bird\n")
  out = tmp_path / "out"
  rc = cli.main(["sample", "--config", tiny, "--out", str(out), "--prompts", str(prompts), "--stream",
                 "--batch-size", "2", "--guidance", "1.0", "--threshold", "inf", "--max-steps", "2",
                 "--name", "run", "--formats", "mp4"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "chunk 3/3" in text
  for i in range(3):
    rec = json.loads((out / f"run_{i:03d}.steps.json").read_text())
    assert rec["steps"] == [2] * 6 and rec["threshold"] == "inf" and rec["guidance"] == 1.0
    assert (out / f"run_{i:03d}.mp4").exists() and not (out / f"run_{i:03d}.gif").exists()
  assert json.loads((out / "run_002.steps.json").read_text())["prompt"] == "a bird"


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "EMPTY"], "holds no prompts"),
    (["--prompts", "/nonexistent/prompts.txt"], "prompts.txt"),
    (["--prompt", "x", "--threshold", "abc"], "--threshold: expected a number"),
    (["--prompt", "x", "--ckpt", "/nonexistent/ckpt"], "checkpoint '/nonexistent/ckpt' does not exist"),
    (["--prompt", "x", "--min-steps", "9"], "--min-steps"),
    (["--prompt", "x", "--formats", "avi"], "--formats"),
    (["--prompt", "  "], "--prompt"),
    ([], "no prompt"),
])
def test_sample_bad_inputs(tmp_path, tiny, capsys, extra, message):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n# nothing\n")
  extra = [str(empty) if e == "EMPTY" else e for e in extra]
  rc = cli.main(["sample", "--config", tiny, "--out", str(tmp_path / "o")] + extra)
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert message in err[-1] and err[-1].startswith("dsa-jax sample: error:")


def test_sample_without_ffmpeg_says_so_before_sampling(tmp_path, tiny, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as on a machine without the package: import fails
  assert cli.main(["sample", "--config", tiny, "--out", str(tmp_path / "o"), "--prompt", "x"]) == 2
  assert "pip install imageio-ffmpeg" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_bench_sample(tmp_path, tiny, capsys):
  path = tmp_path / "bench.json"
  rc = cli.main(["bench", "sample", "--config", tiny, "--steps", "2", "--runs", "2", "--json", str(path)])
  assert rc == 0
  res = json.loads(path.read_text())
  assert res["mode"] == {"kind": "steps", "steps": 2}
  assert res["steps"]["forwards_per_chunk"] == [2, 2, 2]
  assert res["video"]["pixel_frames"] == 21
  for key in ("dit", "dit_vae"):
    assert res["fps"][key] > 0
  assert res["compile_s"]["program"] > 0 and res["stream"]["latents"]["first_chunk_s"] > 0
  assert len(res["components"]["denoise_step_s"]) == 3 and res["components"]["totals_s"]["vae"] > 0
  assert res["components"]["totals_s"]["text_kv"] > 0  # once per video, as in the sampler's program
  assert "FPS DiT" in capsys.readouterr().out


def test_repeated_prompt_flags_give_several_videos():
  import argparse
  from dsa_jax.commands import sample as sample_cmd
  args = argparse.Namespace(prompts=None, prompt_schedule=None, prompt=["a cat", " a dog "])
  assert sample_cmd.read_prompts(args) == ["a cat", "a dog"]
  with pytest.raises(ValueError, match="empty"):
    sample_cmd.read_prompts(argparse.Namespace(prompts=None, prompt_schedule=None, prompt=["a", " "]))


def test_prompts_are_encoded_up_front_in_padded_batches():
  """`dsa-jax sample` encodes every batch (the last padded with its last prompt), the negative prompt and a schedule
  before sampling, so the text encoder can be let go; bf16 configs keep the contexts in bf16, which is what the DiT
  casts them to first."""
  import ml_dtypes

  from dsa_jax.commands.sample import encode_batches
  calls = []

  def encode(prompts):
    calls.append(list(prompts))
    return np.stack([np.full((3, 2), len(p) + 0.1, np.float32) for p in prompts])

  contexts, uncond = encode_batches(encode, ["a", "bb", "ccc"], 2, negative_prompt="neg")
  assert calls == [["a", "bb"], ["ccc", "ccc"], ["neg"]]
  assert [c.shape for c in contexts] == [(2, 3, 2), (2, 3, 2)] and contexts[0].dtype == np.float32
  assert uncond.shape == (1, 3, 2) and contexts[1][1, 0, 0] == np.float32(3.1)
  calls.clear()
  contexts, uncond = encode_batches(encode, ["x"], 1, schedule=[(0, "a"), (4, "bbb")], dtype="bfloat16")
  assert calls == [["a", "bbb"]] and uncond is None
  assert contexts[0].shape == (1, 2, 3, 2) and contexts[0].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(contexts[0].astype(np.float32).astype(ml_dtypes.bfloat16), contexts[0])
  assert contexts[0][0, 1, 0, 0] == ml_dtypes.bfloat16(3.1)


def test_batch_fills_the_data_parallel_devices_or_says_why_not():
  """On a mesh of N data x fsdp devices the default batch takes one video per device; a batch that cannot split
  over them (replicated: every device samples every video) is kept and warned about, naming both ways out."""
  from dsa_jax.commands.sample import batch_over_devices
  assert batch_over_devices(1, False, 1, 5, False) == (1, None)  # one device: as asked
  assert batch_over_devices(1, False, 2, 5, False) == (2, None)  # default batch: one video per device
  assert batch_over_devices(4, True, 2, 5, False) == (4, None)  # asked for, and it splits
  for args in ((1, False, 2, 1, False), (3, True, 2, 5, False), (1, False, 2, 5, True)):  # 1 prompt, 3 of 2, schedule
    batch, note = batch_over_devices(*args)
    assert batch == args[0] and "does not split over the mesh's data x fsdp = 2 devices" in note, (args, note)
    assert "--config.mesh.shape.tensor=2" in note
    assert ("--batch-size 2" in note) != args[4]  # a prompt schedule samples one video: no batch to raise


def test_write_sample_checks_its_record_before_writing(tmp_path):
  """A record a Python user plausibly passes (a batch's steps, jax arrays, no steps) is refused or converted before
  any file is written: the video without its JSON and plot was left behind."""
  import jax.numpy as jnp
  from dsa_jax.sampling import outputs
  pixels = np.zeros((5, 16, 16, 3), np.float32)
  for record in ({"confidences": np.zeros(2)}, {"steps": np.ones((1, 2)), "confidences": np.zeros((1, 2))}):
    with pytest.raises(ValueError, match="record"):
      outputs.write_sample(str(tmp_path / "bad"), "s", pixels, record, fps=8, chunk_frames=1, formats=["gif"])
  assert not (tmp_path / "bad").exists()
  paths = outputs.write_sample(str(tmp_path), "s", pixels, {"steps": jnp.array([2, 3]),
                               "confidences": jnp.array([0.5, 0.7])}, fps=8, chunk_frames=1, formats=["gif"])
  assert sorted(paths) == ["gif", "json", "png"] and json.loads((tmp_path / "s.steps.json").read_text())["steps"] == [2, 3]

