"""Tests of the data layer: prompt sources, grain pipeline, video records, bag-of-words encoder, moving digits."""

import argparse
import json
import os

import grain
import jax
import ml_collections
import numpy as np
import pytest

from dsa_jax.data import bow_text, digits, pipeline, prompts, videos


# ----------------------------------------------------------------------------------------------------------------------
# Prompt sources


def _write(path, data: bytes):
  path.write_bytes(data)
  return str(path)


def test_text_prompts_skip_blank_and_comments(tmp_path):
  p = _write(tmp_path / "p.txt", b"# header\n\na red fox\n  two cats  \n# end\n\n")
  src = prompts.TextPromptSource(p)
  assert len(src) == 2
  assert [src[0], src[1]] == ["a red fox", "two cats"]
  assert src[-1] == "two cats"
  assert isinstance(src, grain.sources.RandomAccessDataSource)
  with pytest.raises(IndexError):
    src[2]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"# only a comment\n"])
def test_text_prompts_empty_file_error_names_file(tmp_path, content):
  p = _write(tmp_path / "empty_prompts.txt", content)
  with pytest.raises(prompts.PromptFileError, match="empty_prompts.txt.*no prompts"):
    prompts.TextPromptSource(p)


def test_text_prompts_bad_utf8_names_file_and_line(tmp_path):
  p = _write(tmp_path / "bad.txt", b"ok one\nok two\n# c\nbad \xff\xfe line\n")
  with pytest.raises(prompts.PromptFileError, match=r"bad\.txt.*line 4.*UTF-8"):
    prompts.TextPromptSource(p)


def test_text_prompts_too_long_line_names_line(tmp_path):
  p = _write(tmp_path / "long.txt", b"short\n" + b"x" * 50 + b"\nshort again\n")
  with pytest.raises(prompts.PromptFileError, match=r"long\.txt.*line 2.*50 characters.*max_chars=20"):
    prompts.TextPromptSource(p, max_chars=20)


def test_text_prompts_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    prompts.TextPromptSource(tmp_path / "nope.txt")
  for name in ("p.json", "p.csv"):  # one "prompt" per raw line of JSON or CSV would be garbage: refused
    p = _write(tmp_path / name, b'["a red ball", "a blue cube"]\n')
    with pytest.raises(prompts.PromptFileError, match=name.replace(".", r"\.") + ".*one prompt per line"):
      prompts.TextPromptSource(p)


def test_csv_prompts(tmp_path):
  p = _write(tmp_path / "p.csv", b'id,prompt,score\n1,"a cat, sitting",0.5\n2,a dog,0.7\n')
  src = prompts.CsvPromptSource(p, "prompt")
  assert list(src.prompts) == ["a cat, sitting", "a dog"]


def test_csv_missing_column_lists_columns(tmp_path):
  p = _write(tmp_path / "p.csv", b"id,text,score\n1,a cat,0.5\n")
  with pytest.raises(prompts.PromptFileError, match=r"p\.csv.*no column 'prompt'.*\['id', 'text', 'score'\]"):
    prompts.CsvPromptSource(p, "prompt")


def test_csv_empty_cell_names_line(tmp_path):
  p = _write(tmp_path / "p.csv", b"id,prompt\n1,a cat\n2,\n")
  with pytest.raises(prompts.PromptFileError, match=r"line 3.*'prompt' is empty"):
    prompts.CsvPromptSource(p, "prompt")


def test_prompt_source_from_config(tmp_path):
  txt = _write(tmp_path / "p.txt", b"one\ntwo\n")
  csv_path = _write(tmp_path / "p.csv", b"caption\nthree\n")
  cfg = ml_collections.ConfigDict({"kind": "text", "path": txt, "column": None, "name": None, "split": None})
  assert prompts.prompt_source_from_config(cfg).prompts == ["one", "two"]
  cfg = ml_collections.ConfigDict({"kind": "csv", "path": csv_path, "column": "caption", "name": "", "split": ""})
  assert prompts.prompt_source_from_config(cfg).prompts == ["three"]
  with pytest.raises(prompts.PromptFileError, match="kind"):
    prompts.prompt_source_from_config(ml_collections.ConfigDict({"kind": "parquet", "path": txt}))
  with pytest.raises(prompts.PromptFileError, match="column"):
    prompts.prompt_source_from_config(ml_collections.ConfigDict({"kind": "csv", "path": csv_path, "column": None}))


def test_tfds_prompt_source_with_fake_tfds(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = {}

  def fake_data_source(name, *, split=None, data_dir=None, download=True):
    calls.update(name=name, split=split, data_dir=data_dir, download=download)
    return [{"caption": b"a bird", "id": 0}, {"caption": np.array(b"a plane"), "id": 1}]

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  cfg = ml_collections.ConfigDict({"kind": "tfds", "name": "my_ds", "split": "validation", "feature": "caption",
                                   "path": None, "column": None})
  src = prompts.prompt_source_from_config(cfg)
  assert [src[0], src[1]] == ["a bird", "a plane"]
  assert calls == {"name": "my_ds", "split": "validation", "data_dir": None, "download": False}
  with pytest.raises(prompts.PromptFileError, match=r"no feature 'text'.*\['caption', 'id'\]"):
    prompts.TfdsPromptSource("my_ds", split="train", feature="text")


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline


def _numbers(n):
  return [{"i": np.int32(i), "p": f"prompt {i}"} for i in range(n)]


def _take(loader, k, key="i"):
  return [next(loader)[key].tolist() for _ in range(k)]


def test_shuffle_is_deterministic_by_seed():
  src = _numbers(40)
  a = _take(pipeline.make_loader(src, batch_size=8, seed=3, shard_index=0, shard_count=1), 10)
  b = _take(pipeline.make_loader(src, batch_size=8, seed=3, shard_index=0, shard_count=1), 10)
  c = _take(pipeline.make_loader(src, batch_size=8, seed=4, shard_index=0, shard_count=1), 10)
  assert a == b
  assert a != c
  epoch0 = sum(a[:5], [])
  epoch1 = sum(a[5:10], [])
  assert sorted(epoch0) == list(range(40)) and sorted(epoch1) == list(range(40))  # each epoch is a permutation
  assert epoch0 != epoch1 and epoch0 != list(range(40))  # reshuffled each epoch, actually shuffled
  plain = _take(pipeline.make_loader(src, batch_size=8, seed=3, shuffle=False, shard_index=0, shard_count=1), 1)
  assert plain == [list(range(8))]


def test_state_restore_gives_same_following_batches():
  src = _numbers(23)
  kw = dict(batch_size=4, seed=11, shard_index=0, shard_count=1)
  ref = pipeline.make_loader(src, **kw)
  _take(ref, 7)  # crosses an epoch boundary (23 examples)
  state = json.loads(json.dumps(ref.get_state()))  # JSON-able
  expected = _take(ref, 9)
  resumed = pipeline.make_loader(src, **kw)
  _take(resumed, 2)  # whatever it did before is overwritten by set_state
  resumed.set_state(state)
  assert _take(resumed, 9) == expected
  # bytes form round trip
  again = pipeline.make_loader(src, **kw)
  again.set_state(pipeline.state_from_bytes(pipeline.state_to_bytes(state)))
  assert _take(again, 9) == expected
  # a state from other data or another seed is refused
  with pytest.raises(pipeline.DataStateError, match="seed"):
    pipeline.make_loader(src, batch_size=4, seed=12, shard_index=0, shard_count=1).set_state(state)
  with pytest.raises(pipeline.DataStateError, match="source_len"):
    pipeline.make_loader(_numbers(24), **kw).set_state(state)


def test_random_map_transform_restores_exactly():
  class Noise(grain.transforms.RandomMap):

    def random_map(self, x, rng):
      return dict(x, r=np.int64(rng.integers(1 << 30)))

  kw = dict(batch_size=3, seed=5, shard_index=0, shard_count=1, transforms=[Noise()])
  ref = pipeline.make_loader(_numbers(10), **kw)
  _take(ref, 4)
  state = ref.get_state()
  expected = _take(ref, 5, key="r")
  resumed = pipeline.make_loader(_numbers(10), **kw)
  resumed.set_state(state)
  assert _take(resumed, 5, key="r") == expected


def test_two_hosts_get_disjoint_examples_forming_the_global_batch():
  src = _numbers(48)
  hosts = [pipeline.make_loader(src, batch_size=4, seed=7, num_epochs=1, shard_index=h, shard_count=2)
           for h in range(2)]
  single = pipeline.make_loader(src, batch_size=8, seed=7, num_epochs=1, shard_index=0, shard_count=1)
  seen = [[], []]
  for step in range(6):
    b = [next(hosts[h])["i"].tolist() for h in range(2)]
    assert not set(b[0]) & set(b[1])
    assert sorted(b[0] + b[1]) == sorted(next(single)["i"].tolist())  # same global batch as one host
    seen[0] += b[0]
    seen[1] += b[1]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(48))
  for h in hosts:  # both hosts run out together (no deadlock in a finite run)
    with pytest.raises(StopIteration):
      next(h)


def test_restore_onto_different_host_count_continues_global_stream():
  src = _numbers(30)
  one = pipeline.make_loader(src, batch_size=6, seed=2, shard_index=0, shard_count=1)
  _take(one, 3)
  state = one.get_state()
  expected = _take(one, 2)
  hosts = [pipeline.make_loader(src, batch_size=3, seed=2, shard_index=h, shard_count=2) for h in range(2)]
  for h in hosts:
    h.set_state(state)
  for batch in expected:
    got = next(hosts[0])["i"].tolist() + next(hosts[1])["i"].tolist()
    assert sorted(got) == sorted(batch)


class _Even(grain.transforms.Filter):

  def filter(self, x):
    return int(x["i"]) % 2 == 0


def test_filter_state_is_per_host():
  src = _numbers(20)
  kw = dict(batch_size=2, seed=1, transforms=[_Even()])
  a = pipeline.make_loader(src, shard_index=0, shard_count=2, **kw)
  got = _take(a, 2)
  assert all(x % 2 == 0 for b in got for x in b)
  state = a.get_state()
  expected = _take(a, 2)
  b = pipeline.make_loader(src, shard_index=0, shard_count=2, **kw)
  b.set_state(state)
  assert _take(b, 2) == expected
  with pytest.raises(pipeline.DataStateError, match="filtering"):
    pipeline.make_loader(src, shard_index=1, shard_count=2, **kw).set_state(state)


def test_loader_state_with_orbax_and_grain_checkpoint_handler(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  src = _numbers(30)
  loader = pipeline.make_loader(src, batch_size=4, seed=9, shard_index=0, shard_count=1)
  _take(loader, 3)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader)))
  mngr.wait_until_finished()
  expected = _take(loader, 4)
  resumed = pipeline.make_loader(src, batch_size=4, seed=9, shard_index=0, shard_count=1)
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert _take(resumed, 4) == expected
  mngr.close()


def test_loader_argument_errors():
  with pytest.raises(ValueError, match="empty"):
    pipeline.make_loader([], batch_size=1, seed=0, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.make_loader(_numbers(4), batch_size=1, seed=0, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="fewer than batch_size"):
    pipeline.make_loader(_numbers(4), batch_size=8, seed=0, num_epochs=1, shard_index=0, shard_count=1)


def test_make_global_batch():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  n = 2 * len(devices)
  batch = {"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3), "p": np.array([f"p{i}" for i in range(n)])}
  out = pipeline.make_global_batch(batch, sharding)
  assert isinstance(out["x"], jax.Array) and out["x"].shape == (n, 3)
  assert out["x"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
  assert out["p"] is batch["p"]  # strings stay host-local


# ----------------------------------------------------------------------------------------------------------------------
# Video records


def test_array_record_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  clips = [{"video": rng.standard_normal((3, 4, 5, 16)).astype(np.float16), "prompt": f"clip {i} ünïcode",
            "labels": np.array([0, i, 2]), "extra": np.arange(6, dtype=np.int32).reshape(2, 3) + i}
           for i in range(4)]
  path = tmp_path / "sub" / "clips.array_record"
  assert videos.write_clips(path, clips) == 4
  assert not [f for f in os.listdir(path.parent) if ".tmp" in f]
  src = videos.VideoClipSource(str(path))
  assert len(src) == 4
  for i, c in enumerate(clips):
    r = src[i]
    assert r["video"].dtype == np.float16 and r["video"].shape == (3, 4, 5, 16)
    np.testing.assert_array_equal(r["video"], c["video"])
    np.testing.assert_array_equal(r["labels"], c["labels"])
    np.testing.assert_array_equal(r["extra"], c["extra"])
    assert r["prompt"] == c["prompt"]
  assert len(videos.VideoClipSource(str(tmp_path / "sub"))) == 4  # a directory works too
  batch = next(pipeline.make_loader(src, batch_size=2, seed=0, shard_index=0, shard_count=1))
  assert batch["video"].shape == (2, 3, 4, 5, 16)


def test_video_record_errors(tmp_path):
  with pytest.raises(videos.VideoRecordError, match="frames, height, width, channels"):
    videos.encode_clip(np.zeros((4, 4, 3), np.uint8), "x")
  with pytest.raises(videos.VideoRecordError, match="labels"):
    videos.encode_clip(np.zeros((2, 4, 4, 1), np.uint8), "x", labels=np.zeros(3, np.int32))
  with pytest.raises(videos.VideoRecordError, match="not a dsa_jax clip record"):
    videos.decode_clip(b"\x05\x00\x00\x00{bad", where="f.array_record record 0")
  path = tmp_path / "aborted.array_record"
  with pytest.raises(RuntimeError):
    with videos.VideoRecordWriter(path) as w:
      w.write(np.zeros((1, 2, 2, 1), np.uint8), "a")
      raise RuntimeError("interrupted")
  assert not os.listdir(tmp_path)  # neither the file nor a temp file is left behind
  with pytest.raises(FileNotFoundError, match="missing.array_record"):
    videos.VideoClipSource(str(tmp_path / "missing.array_record"))


# ----------------------------------------------------------------------------------------------------------------------
# Bag-of-words text encoder


def test_bow_encoder_determinism_padding_and_save():
  vocab = list(digits.PROMPT_VOCAB)
  enc = bow_text.BagOfWordsEncoder(vocab, text_len=12, text_dim=16, seed=3)
  texts = ["digits 3 and 7 move slowly", "digit 5 zebra stands still", "a " * 20]
  out = enc.encode(texts)
  assert out.shape == (3, 12, 16) and out.dtype == np.float32
  np.testing.assert_array_equal(out, bow_text.BagOfWordsEncoder(vocab, 12, 16, 3).encode(texts))
  assert not np.allclose(out, bow_text.BagOfWordsEncoder(vocab, 12, 16, 4).encode(texts))
  ids, lengths = enc.token_ids(texts)
  assert lengths.tolist() == [6, 5, 12]  # the third is cut to text_len
  assert ids[1, 2] == bow_text.UNK  # 'zebra'
  assert np.all(out[0, 6:] == 0) and np.all(out[1, 5:] == 0)  # zero padding like Wan's context
  assert np.all(np.abs(out[0, :6]).sum(-1) > 0)
  # the same word at the same position gives the same vector; at another position a different one
  np.testing.assert_array_equal(out[0, 1], enc.encode(["digit 3"])[0, 1])
  assert not np.allclose(enc.encode(["3 x"])[0, 0], enc.encode(["x 3"])[0, 1])
  d = json.loads(json.dumps(enc.to_dict()))
  np.testing.assert_array_equal(bow_text.BagOfWordsEncoder.from_dict(d).encode(texts), out)
  # adding words does not move existing vectors
  bigger = bow_text.BagOfWordsEncoder(["zebra"] + vocab, 12, 16, 3)
  np.testing.assert_array_equal(bigger.encode(texts[:1]), out[:1])
  with pytest.raises(ValueError, match="single lower-case word"):
    bow_text.BagOfWordsEncoder(["two words"], 4, 4)
  ex = enc.encode_example({"prompt": texts[0], "video": np.zeros((1, 2, 2, 1), np.uint8)})
  assert sorted(ex) == ["context", "length", "prompt", "video"] and ex["length"] == 6
  np.testing.assert_array_equal(ex["context"], out[0])


# ----------------------------------------------------------------------------------------------------------------------
# Moving digits


def test_digits_split_disjoint_by_source_image():
  train, test = digits.source_indices("train"), digits.source_indices("test")
  assert not set(train.tolist()) & set(test.tolist())
  assert len(train) + len(test) == len(digits.source_images()[0])
  _, classes = digits.source_images()
  assert set(classes[test].tolist()) == set(range(10))
  for split, allowed in (("train", set(train.tolist())), ("test", set(test.tolist()))):
    src = digits.MovingDigitsSource(12, split=split, seed=1, frames=12, size=32)
    used = set()
    for i in range(len(src)):
      s = src[i]["sources"]
      used |= set(s[s >= 0].tolist())
    assert used and used <= allowed


def test_digits_clips():
  frames, size = 16, 32
  clips = [digits.make_clip(i, split="train", seed=0, frames=frames, size=size, with_info=True) for i in range(80)]
  labels = np.concatenate([c["labels"] for c in clips])
  for c in clips:
    assert c["video"].shape == (frames, size, size, 1) and c["video"].dtype == np.uint8
    assert c["labels"].shape == (frames,) and c["labels"].dtype == np.int32
    assert c["digits"].shape == (frames, digits.MAX_DIGITS)
    assert c["video"].max() > 100  # digits are visible
    assert not set(bow_text.tokenize(c["prompt"])) - set(digits.PROMPT_VOCAB)  # closed grammar
    # the prompt names the events that the labels mark
    assert c["prompt"].count("cut to") == sum(1 for _, e in c["events"] if e == "cut")
    assert c["prompt"].count(" enters") == sum(1 for _, e in c["events"] if e == "enter")
    for t, e in c["events"]:
      assert c["labels"][t] == digits.EVENT_NAMES.index(e) or (e != "cut" and c["labels"][t] != 0)
  for e in range(1, len(digits.EVENT_NAMES)):  # every event type occurs
    assert (labels == e).any(), digits.EVENT_NAMES[e]
  assert (labels == 0).mean() > 0.6  # most frames are easy
  static = [c for c in clips if c["kind_name"] == "static"]
  assert static
  for c in static:  # static clips are constant
    assert np.abs(c["video"].astype(int) - c["video"][:1].astype(int)).max() == 0
    assert (c["labels"] == 0).all() and "still" in c["prompt"]
  moving = [c for c in clips if c["kind_name"] == "fast"]
  assert moving and all(np.abs(np.diff(c["video"].astype(int), axis=0)).max() > 50 for c in moving)
  slow = [c for c in clips if c["kind_name"] == "slow" and not c["events"]]
  for c in slow:  # slow clips change little from frame to frame when nothing happens
    quiet = np.flatnonzero(c["labels"][1:] == 0) + 1
    step = np.abs(np.diff(c["video"].astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    assert step[quiet - 1].max() < 8.0
  # deterministic by seed
  again = digits.make_clip(5, split="train", seed=0, frames=frames, size=size)
  np.testing.assert_array_equal(again["video"], clips[5]["video"])
  assert again["prompt"] == clips[5]["prompt"]
  other = digits.make_clip(5, split="train", seed=1, frames=frames, size=size)
  assert not np.array_equal(other["video"], clips[5]["video"])


def test_digits_bad_arguments():
  with pytest.raises(digits.DigitsConfigError, match="split"):
    digits.make_clip(0, split="validation")
  with pytest.raises(digits.DigitsConfigError, match="size"):
    digits.make_clip(0, size=8)
  with pytest.raises(digits.DigitsConfigError, match="digit_size"):
    digits.make_clip(0, size=32, digit_size=20)


def test_write_digits_round_trip_and_cli(tmp_path):
  from dsa_jax.commands import data as data_cmd
  out = tmp_path / "digits_test"
  parser = argparse.ArgumentParser()
  data_cmd.add_arguments(parser)
  args = parser.parse_args(["digits", "--out", str(out), "--num", "6", "--split", "test", "--seed", "2",
                            "--frames", "8", "--size", "32", "--preview", "3"])
  assert data_cmd.main(args) == 0
  for name in ("clips.array_record", "prompts.txt", "meta.json", "preview.gif", "preview.png"):
    assert (out / name).stat().st_size > 0, name
  meta = digits.read_meta(out)
  assert (meta["split"], meta["num"], meta["frames"], meta["size"]) == ("test", 6, 8, 32)
  src = digits.digits_source(out)
  file_prompts = prompts.TextPromptSource(out / "prompts.txt").prompts
  assert len(src) == 6 and len(file_prompts) == 6
  for i in range(6):
    ref = digits.make_clip(i, split="test", seed=2, frames=8, size=32)
    rec = src[i]
    for key in ("video", "labels", "digits", "sources", "speed", "kind"):
      np.testing.assert_array_equal(rec[key], ref[key])
    assert rec["prompt"] == ref["prompt"] == file_prompts[i] == meta["clips"][i]["prompt"]
  import imageio.v2 as imageio
  gif = imageio.mimread(out / "preview.gif")
  assert len(gif) == 8
