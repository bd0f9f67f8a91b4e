"""`dsa-jax sample` with --num-frames, a window, --init-image/--init-video and --prompt-schedule (digits and tiny
configs, CPU), and the schedule / given-frame readers."""

import json

import numpy as np
import pytest
from PIL import Image

from dsa_jax import cli
from dsa_jax.sampling import inputs


def _gif(path, frames):
  ims = [Image.fromarray(f) for f in frames]
  ims[0].save(path, save_all=True, append_images=ims[1:], duration=100, loop=0)
  return str(path)


def test_image_to_video_with_schedule_on_digits(tmp_path, capsys):
  img = np.zeros((40, 48, 3), np.uint8)
  img[12:28, 18:30] = 255  # a white block, centred
  Image.fromarray(img).save(tmp_path / "start.png")
  out = tmp_path / "out"
  rc = cli.main(["sample", "--config", "digits", "--out", str(out), "--num-frames", "12", "--init-image",
                 str(tmp_path / "start.png"), "--prompt-schedule", "0:digit 3 moves fast; 6:digit 8 moves slowly",
                 "--config.sampling.window_frames=4", "--config.sampling.sink_frames=2", "--formats", "gif",
                 "--name", "i2v"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "resized 48x40 to cover 32x32" in text and "-> 1 latent frame(s)" in text
  assert "attention over 2 sink + the last 4 frames" in text
  rec = json.loads((out / "i2v.steps.json").read_text())
  assert len(rec["steps"]) == 12 and rec["steps"][0] == 0 and min(rec["steps"][1:]) >= 1
  assert rec["given_frames"] == 1 and rec["prompt_schedule"][1] == {"frame": 6, "prompt": "digit 8 moves slowly"}
  assert rec["config"]["window_frames"] == 4 and rec["config"]["sink_frames"] == 2
  import imageio.v2 as imageio
  gif = np.stack(imageio.mimread(str(out / "i2v.gif")))
  assert len(gif) == 12
  first = gif[0, ..., 0].astype(np.float32)
  assert first[16, 16] > 200 and first[2, 2] < 50  # the given image is the first frame (scaled 40 -> 32: block kept)


def test_continue_a_video_streaming(tmp_path, capsys):
  rs = np.random.RandomState(0)
  clip = _gif(tmp_path / "clip.gif", [rs.randint(0, 255, (32, 32, 3)).astype(np.uint8) for _ in range(3)])
  out = tmp_path / "out"
  rc = cli.main(["sample", "--config", "digits", "--out", str(out), "--num-frames", "8", "--init-video", clip,
                 "--prompt", "digit 5 moves slowly", "--stream", "--formats", "gif", "--name", "cont"])
  assert rc == 0
  assert "-> 3 latent frame(s)" in capsys.readouterr().out
  rec = json.loads((out / "cont.steps.json").read_text())
  # Three given frames: chunk 0 and the first frame of chunk 1 take no step; frame 3 is sampled next to frame 2.
  assert rec["steps"][:3] == [0, 0, 0] and min(rec["steps"][3:]) >= 1 and len(rec["steps"]) == 8


@pytest.mark.parametrize("extra, message", [
    (["--num-frames", "7"], "num_frames: expected a positive multiple of video.chunk_frames = 2"),
    (["--prompt-schedule", "0:a; 3:b"], "--prompt-schedule: frame 3 must be a multiple of video.chunk_frames"),
    (["--prompt-schedule", "2:a; 4:b"], "--prompt-schedule: the schedule must start at frame 0"),
    (["--prompt-schedule", "0:a; 4"], "expected 'FRAME:PROMPT"),
    (["--prompt-schedule", "0:a; 8:b"], "below the video's 6 latent frames"),
    (["--prompt", "x", "--init-image", "BAD"], "--init-image: cannot read"),
    (["--prompt", "x", "--init-video", "/nonexistent/clip.mp4"], "does not exist"),
    (["--prompt", "x", "--init-video", "notes.txt"], "expected an mp4, gif, png or jpg file"),
    (["--prompt", "x", "--init-image", "GOOD"], "has no encoder"),
    (["--prompt", "x", "--config.sampling.window_frames=3"], "window_frames: expected a multiple"),
])
def test_long_video_bad_inputs(tmp_path, capsys, extra, message):
  (tmp_path / "bad.png").write_bytes(b"not a png")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
  extra = [{"BAD": str(tmp_path / "bad.png"), "GOOD": str(tmp_path / "good.png")}.get(e, e) for e in extra]
  if "--prompt" not in extra and "--prompt-schedule" not in extra:
    extra = ["--prompt", "x"] + extra
  rc = cli.main(["sample", "--config", "tiny", "--out", str(tmp_path / "o")] + extra)
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert message in err[-1] and err[-1].startswith("dsa-jax sample: error:"), err


def test_too_many_given_frames_for_the_window(tmp_path, capsys):
  clip = _gif(tmp_path / "long.gif", [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(7)])
  rc = cli.main(["sample", "--config", "digits", "--out", str(tmp_path / "o"), "--prompt", "digit 1 moves fast",
                 "--init-video", clip, "--num-frames", "16", "--config.sampling.window_frames=4",
                 "--config.sampling.sink_frames=2"])
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "--init-video" in err and "7 given frames exceed the attention window of 6 frames" in err


def test_schedule_forms(tmp_path):
  want = [(0, "digit 3 moves fast"), (8, "an 8 enters")]
  assert inputs.parse_schedule("0:digit 3 moves fast; 8:an 8 enters") == want
  (tmp_path / "a.json").write_text(json.dumps({"0": "digit 3 moves fast", "8": "an 8 enters"}))
  (tmp_path / "b.json").write_text(json.dumps([{"frame": 0, "prompt": "digit 3 moves fast"},
                                               {"frame": 8, "prompt": "an 8 enters"}]))
  assert inputs.parse_schedule(str(tmp_path / "a.json")) == want == inputs.parse_schedule(str(tmp_path / "b.json"))
  np.testing.assert_array_equal(inputs.schedule_index(want, 16, 2), [0, 0, 0, 0, 1, 1, 1, 1])
  with pytest.raises(ValueError, match="frames must increase"):
    inputs.schedule_index([(0, "a"), (8, "b"), (4, "c")], 16, 2)
  (tmp_path / "c.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="expected an object"):
    inputs.parse_schedule(str(tmp_path / "c.json"))
  with pytest.raises(ValueError, match="the prompt at frame 8 is empty"):
    inputs.parse_schedule("0:a; 8: ")
  # a frame that is not a whole number, or given twice, is refused by name (it was truncated, or the last one kept)
  for i, bad in enumerate(['[{"frame": 0, "prompt": "a"}, {"frame": 2.9, "prompt": "b"}]',
                           '[{"frame": true, "prompt": "a"}]', '{"0": "a", "2": "b", "2": "c"}']):
    (tmp_path / f"bad{i}.json").write_text(bad)
    with pytest.raises(ValueError, match="not a whole number|given more than once"):
      inputs.parse_schedule(str(tmp_path / f"bad{i}.json"))
  with pytest.raises(ValueError, match="frame '2.5' is not a whole number"):
    inputs.parse_schedule("0:a; 2.5:b")


def test_wan_vae_encodes_given_frames(tmp_path, tiny_config):
  """A Wan config encodes 1 + 4k pixel frames to 1 + k latents (extra frames dropped from the start)."""
  from dsa_jax.sampling import decode
  cfg = tiny_config.copy_and_resolve_references()
  cfg.vae.kind = "wan"
  dec = decode.PixelDecoder.random(cfg)
  rs = np.random.RandomState(0)
  clip = _gif(tmp_path / "clip.gif", [rs.randint(0, 255, (40, 48, 3)).astype(np.uint8) for _ in range(7)])
  said = []
  lat = inputs.load_init(cfg, clip, "--init-video", vae=(dec.vae, dec.vae_params), say=said.append)
  assert lat.shape == (2, 8, 12, 4) and np.isfinite(lat).all()
  assert "7 frame(s)" in said[0] and "dropped the first 2 of 7 frames" in said[0] and "cropped the centre" in said[0]
