"""ODE-pair initialisation of the causal student (CausVid's regression onto the teacher's ODE solutions).

The frozen bidirectional teacher integrates the flow ODE dx/dsigma = v from pure noise to a clean video with many
Euler steps (`train.ode_steps`, with classifier-free guidance `train.ode_guidance`, default `dmd.guidance`, Self
Forcing's convention). The integration grid passes exactly through every sigma of the training ladder (train.ladder,
else sampling.ladder), so the trajectory is recorded at the sigmas the student will meet. The student then learns,
under the block-causal mask, to map x_{sigma_k} (a ladder index k drawn per chunk) to the trajectory's end x0.

Pairs are generated on the fly inside the training step, or once by `dsa-jax data ode-pairs` (`generate_ode_pairs`)
into an ArrayRecord file (the clip format of `dsa_jax.data.videos`: `video` = x0, extra `trajectory` =
(K, F, H, W, C), the prompt) that the ode stage reads when `train.ode_pairs` names it.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsa_jax.diffusion import flow
from dsa_jax.diffusion.guidance import guided_velocity
from dsa_jax.models.dit import WanDiT


class OdePairsError(ValueError):
  """A stored ODE-pair file does not match the config."""


def ode_grid(ladder_sigmas: Sequence[float], num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Integration grid from sigma 1 to 0 through every ladder sigma.

  Returns (grid (S+1,) decreasing from 1.0 to 0.0, ladder_pos (K,) grid indices of the ladder sigmas). The
  `num_steps` Euler steps are spread evenly over the segments between anchors (at least one per segment).
  """
  lad = [float(s) for s in ladder_sigmas]
  anchors = ([1.0] if lad[0] < 1.0 - 1e-7 else []) + lad + [0.0]
  segments = len(anchors) - 1
  per = [max(1, num_steps // segments + (1 if i < num_steps % segments else 0)) for i in range(segments)]
  grid = [anchors[0]]
  for i in range(segments):
    a, b = anchors[i], anchors[i + 1]
    grid.extend(list(np.linspace(a, b, per[i] + 1)[1:]))
  grid = np.asarray(grid, np.float64)
  pos = np.array([int(np.argmin(np.abs(grid - s))) for s in lad], np.int32)
  grid[pos] = np.asarray(lad)  # exact
  return grid.astype(np.float32), pos


def teacher_x0(tcfg, teacher_params, x_t, t, context, uncond, guidance: float, num_train_timesteps: int):
  """x0 of the (bidirectional) teacher with Self Forcing's guidance cond + g (cond - uncond); g = 0 skips uncond.

  `t` is in [0, num_train_timesteps] (`config.diffusion.num_train_timesteps`), the model's timestep scale."""
  model = WanDiT(tcfg)
  sigma = t / num_train_timesteps
  if guidance == 0.0:
    v = model.apply(teacher_params, x_t, t, context)["velocity"]
    return flow.x0_from_velocity(x_t, v, sigma)
  b = x_t.shape[0]
  unc = jnp.broadcast_to(uncond.astype(context.dtype), (b,) + uncond.shape[1:])
  v = model.apply(teacher_params, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                  jnp.concatenate([context, unc]))["velocity"]
  x0 = flow.x0_from_velocity(jnp.concatenate([x_t, x_t]), v, jnp.concatenate([sigma, sigma]))
  return guided_velocity(x0[:b], x0[b:], guidance)


def teacher_velocity(tcfg, teacher_params, x_t, t, context, uncond, guidance: float):
  """Guided velocity (same convention); used by the ODE integration."""
  model = WanDiT(tcfg)
  if guidance == 0.0:
    return model.apply(teacher_params, x_t, t, context)["velocity"]
  b = x_t.shape[0]
  unc = jnp.broadcast_to(uncond.astype(context.dtype), (b,) + uncond.shape[1:])
  v = model.apply(teacher_params, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                  jnp.concatenate([context, unc]))["velocity"]
  return guided_velocity(v[:b], v[b:], guidance)


def teacher_trajectory(tcfg, teacher_params, noise, context, uncond, grid: np.ndarray, ladder_pos: np.ndarray,
                       guidance: float, num_train_timesteps: int = 1000):
  """Euler-integrates the teacher's flow ODE from `noise` (sigma = 1) over `grid`, without gradient.

  Returns (trajectory (B, K, F, H, W, C) at the ladder sigmas, x0 (B, F, H, W, C)).
  """
  teacher_params = jax.lax.stop_gradient(teacher_params)
  b, f = noise.shape[:2]
  k = len(ladder_pos)
  slot = np.full(len(grid), -1, np.int32)
  slot[ladder_pos] = np.arange(k, dtype=np.int32)
  grid_j = jnp.asarray(grid, jnp.float32)
  slot_j = jnp.asarray(slot)

  def record(traj, x, n):
    s = slot_j[n]
    upd = jax.lax.dynamic_update_slice_in_dim(traj, x[:, None].astype(traj.dtype), jnp.maximum(s, 0), axis=1)
    return jnp.where(s >= 0, upd, traj)

  def step(carry, n):
    x, traj = carry
    traj = record(traj, x, n)
    s, s_next = grid_j[n], grid_j[n + 1]
    t = jnp.full((b, f), s * num_train_timesteps, jnp.float32)
    v = teacher_velocity(tcfg, teacher_params, x, t, context, uncond, guidance)
    x = (x.astype(jnp.float32) + (s_next - s) * v).astype(x.dtype)
    return (x, traj), None

  traj = jnp.zeros((b, k) + noise.shape[1:], jnp.float32)
  (x0, traj), _ = jax.lax.scan(step, (noise.astype(jnp.float32), traj), jnp.arange(len(grid) - 1))
  return jax.lax.stop_gradient(traj), jax.lax.stop_gradient(x0)


def sample_ladder_indices(key, batch: int, num_frames: int, chunk_frames: int, num_steps: int):
  """One ladder index per chunk (repeated over its frames), like CausVid's per-block timesteps: (B, F) int32."""
  idx = jax.random.randint(key, (batch, num_frames // chunk_frames), 0, num_steps, dtype=jnp.int32)
  return jnp.repeat(idx, chunk_frames, axis=1)


def gather_trajectory(traj, idx):
  """traj (B, K, F, H, W, C), idx (B, F) -> x (B, F, H, W, C): frame f taken at ladder index idx[b, f]."""
  k = traj.shape[1]
  onehot = jax.nn.one_hot(idx, k, dtype=traj.dtype)  # (B, F, K)
  return jnp.einsum("bfk,bkf...->bf...", onehot, traj)


# ----------------------------------------------------------------------------------------------------------------------
# Stored pairs


def write_ode_pairs(path: str, x0: np.ndarray, trajectory: np.ndarray, prompts: Sequence[str], *, append_to=None,
                    sigmas: Sequence[float] | None = None):
  """Writes pairs to an ArrayRecord file (atomically). x0 (N, F, H, W, C), trajectory (N, K, F, H, W, C), and the
  K ladder sigmas the trajectory was recorded at, which the ode stage checks against its own ladder."""
  from dsa_jax.data.videos import VideoRecordWriter
  x0 = np.asarray(x0, np.float32)
  trajectory = np.asarray(trajectory, np.float32)
  if trajectory.shape[0] != x0.shape[0] or trajectory.shape[2:] != x0.shape[1:] or len(prompts) != x0.shape[0]:
    raise OdePairsError(f"write_ode_pairs: x0 {x0.shape}, trajectory {trajectory.shape} and {len(prompts)} prompts "
                        "do not match (expected (N,F,H,W,C), (N,K,F,H,W,C), N)")
  extras = {} if sigmas is None else {"sigmas": np.asarray(sigmas, np.float32)}
  if sigmas is not None and extras["sigmas"].shape != trajectory.shape[1:2]:
    raise OdePairsError(f"write_ode_pairs: {len(extras['sigmas'])} sigmas for a trajectory of {trajectory.shape[1]} "
                        "ladder points")
  if append_to is not None:
    for i in range(x0.shape[0]):
      append_to.write(x0[i], prompts[i], extras={"trajectory": trajectory[i], **extras})
    return path
  with VideoRecordWriter(path) as writer:  # an error mid-way removes the partial file
    write_ode_pairs(path, x0, trajectory, prompts, append_to=writer, sigmas=sigmas)
  return path


def generate_ode_pairs(config, teacher_params, prompts: Sequence[str], path: str, *, text_encoder, uncond,
                       batch_size: int = 1, seed: int = 0) -> str:
  """Runs the teacher on `prompts` (single device, batch by batch) and writes the pairs file for `train.ode_pairs`."""
  from dsa_jax.data.videos import VideoRecordWriter
  from dsa_jax.models import factory
  from dsa_jax.training.rollout import RolloutSpec
  spec = RolloutSpec.from_config(config)
  tcfg = factory.dit_config(config, "teacher")
  grid, pos = ode_grid(spec.sigmas, int(config.train.ode_steps))
  from dsa_jax.training.steps import ode_guidance
  guidance = ode_guidance(config)
  ntt = int(config.diffusion.num_train_timesteps)
  fn = jax.jit(lambda p, n, c, u: teacher_trajectory(tcfg, p, n, c, u, grid, pos, guidance, ntt))
  key = jax.random.PRNGKey(seed)
  with VideoRecordWriter(path) as w:
    for start in range(0, len(prompts), batch_size):
      chunk = list(prompts[start:start + batch_size])
      ctx = jnp.asarray(text_encoder(chunk))
      noise = jax.random.normal(jax.random.fold_in(key, start),
                                (len(chunk), spec.num_frames, spec.height, spec.width, spec.channels))
      traj, x0 = fn(teacher_params, noise, ctx, jnp.asarray(uncond))
      write_ode_pairs(path, np.asarray(x0), np.asarray(traj), chunk, append_to=w, sigmas=spec.sigmas)
  return path


class OdePairSource:
  """Random-access source of stored pairs: dict(video=x0, trajectory, prompt); checks shapes against the config."""

  def __init__(self, path: str, config):
    from dsa_jax.data.videos import VideoClipSource
    from dsa_jax.training.rollout import RolloutSpec
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.train.ode_pairs: {path!r} does not exist")
    self._src = VideoClipSource(path)
    spec = RolloutSpec.from_config(config)
    first = self._src[0]
    want = (spec.num_frames, spec.height, spec.width, spec.channels)
    if "trajectory" not in first:
      raise OdePairsError(f"config.train.ode_pairs: {path!r} records have no 'trajectory' (not an ODE-pair file)")
    if tuple(first["video"].shape) != want or tuple(first["trajectory"].shape[1:]) != want:
      raise OdePairsError(f"config.train.ode_pairs: {path!r} holds x0 {first['video'].shape} / trajectory "
                          f"{first['trajectory'].shape}, the config expects (F,H,W,C) = {want}")
    if first["trajectory"].shape[0] < spec.num_steps:
      raise OdePairsError(f"config.train.ode_pairs: {path!r} has {first['trajectory'].shape[0]} ladder points, the "
                          f"config samples {spec.num_steps} steps")
    if "sigmas" in first:  # (files written before the sigmas were stored cannot be checked)
      stored, own = np.asarray(first["sigmas"], np.float64), np.asarray(spec.sigmas, np.float64)
      if stored.shape != own.shape or not np.allclose(stored, own, atol=1e-5):
        raise OdePairsError(
            f"config.train.ode_pairs: {path!r} was recorded at sigmas {np.round(stored, 4).tolist()}, this config's "
            f"ladder has {np.round(own, 4).tolist()} (train.ladder, else sampling.ladder, with diffusion.shift): "
            "make the pairs with this config (`dsa-jax data ode-pairs`)")

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    rec = self._src[i]
    return {"prompt": rec["prompt"], "video": rec["video"].astype(np.float32),
            "trajectory": rec["trajectory"].astype(np.float32)}
