"""Metrics of the moving-digits benchmark: Fréchet distance (quality), prompt agreement (semantics), steps by event.

Fréchet distance between Gaussians fitted to two feature sets (as FID/FVD):
  FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).
The trace term is computed from the eigenvalues of the symmetric PSD matrix S_a^1/2 S_b S_a^1/2 (eigh), not from a
general `sqrtm(S_a @ S_b)`, which is non-symmetric, can return complex parts and loses precision when the
covariances are near singular (few samples, many features). Both give the same value in exact arithmetic since
S_a S_b is similar to S_a^1/2 S_b S_a^1/2.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

NUM_DIGITS = 10
_NUMBER_RE = re.compile(r"\b\d+\b")


class MetricError(ValueError):
  """Bad metric input; the message names the argument and what was expected."""


# ----------------------------------------------------------------------------------------------------------------------
# Fréchet distance


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise MetricError(f"features: expected (N >= 2, D), got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise MetricError("features: contain NaN or inf (did sampling diverge?)")
  return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s_a: np.ndarray, s_b: np.ndarray) -> float:
  """tr((S_a S_b)^1/2) for symmetric PSD S_a, S_b (via the symmetric form, see the module docstring)."""
  r = _psd_sqrt(np.asarray(s_a, np.float64))
  m = r @ np.asarray(s_b, np.float64) @ r
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_from_stats(mu_a, s_a, mu_b, s_b) -> float:
  """Fréchet distance between N(mu_a, S_a) and N(mu_b, S_b); >= 0."""
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  s_a, s_b = np.atleast_2d(np.asarray(s_a, np.float64)), np.atleast_2d(np.asarray(s_b, np.float64))
  if mu_a.shape != mu_b.shape or s_a.shape != s_b.shape or s_a.shape != (mu_a.size, mu_a.size):
    raise MetricError(f"frechet: mismatched shapes mu {mu_a.shape} / {mu_b.shape}, cov {s_a.shape} / {s_b.shape}")
  diff = mu_a - mu_b
  fd = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * trace_sqrt_product(s_a, s_b))
  return max(fd, 0.0)


def frechet_terms(mu_a, s_a, mu_b, s_b) -> dict[str, float]:
  """What a Fréchet distance is made of: 'mean' |mu_a - mu_b|^2 (a shift of the whole set, e.g. every clip too blurry)
  and 'cov' the rest (shape and spread); 'spread' tr(S_a) / tr(S_b), the first set's feature spread relative to the
  second's (well below 1: lost diversity)."""
  fd = frechet_from_stats(mu_a, s_a, mu_b, s_b)
  diff = np.asarray(mu_a, np.float64) - np.asarray(mu_b, np.float64)
  mean = float(diff @ diff)
  tr_b = float(np.trace(np.atleast_2d(s_b)))
  return {"mean": mean, "cov": fd - mean,
          "spread": float(np.trace(np.atleast_2d(s_a))) / tr_b if tr_b > 0 else float("nan")}


def frechet_distance(features_a, features_b) -> float:
  """Fréchet distance between the Gaussians fitted to two (N, D) feature sets."""
  a, b = np.asarray(features_a), np.asarray(features_b)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise MetricError(f"frechet_distance: expected (N, D) and (M, D) features, got {a.shape} and {b.shape}")
  return frechet_from_stats(*feature_stats(a), *feature_stats(b))


# ----------------------------------------------------------------------------------------------------------------------
# Prompt agreement


def prompt_digits(prompt: str) -> frozenset[int]:
  """The digit classes a moving-digits prompt names (every number word of the grammar is a digit class).

  "digits 3 and 7 move slowly; then an 8 enters; then cut to digit 2 moving fast" -> {2, 3, 7, 8}.
  """
  if not isinstance(prompt, str):
    raise MetricError(f"prompt: expected a string, got {type(prompt).__name__}")
  found = set()
  for tok in _NUMBER_RE.findall(prompt):
    if len(tok) != 1:
      raise MetricError(f"prompt {prompt!r}: number {tok!r} is not a digit class 0-9 (not a moving-digits prompt?)")
    found.add(int(tok))
  return frozenset(found)


def multi_hot(sets: Iterable[Iterable[int]]) -> np.ndarray:
  """Digit sets -> (N, 10) bool."""
  rows = []
  for s in sets:
    row = np.zeros(NUM_DIGITS, bool)
    for d in s:
      if not 0 <= int(d) < NUM_DIGITS:
        raise MetricError(f"digit {d!r} outside 0-9")
      row[int(d)] = True
    rows.append(row)
  return np.stack(rows) if rows else np.zeros((0, NUM_DIGITS), bool)


def prompts_multi_hot(prompts: Sequence[str]) -> np.ndarray:
  return multi_hot(prompt_digits(p) for p in prompts)


def digit_f1(pred, true) -> np.ndarray:
  """Per-clip F1 of predicted vs. true digit sets (N, 10) bool -> (N,); two empty sets score 1."""
  pred, true = np.asarray(pred, bool), np.asarray(true, bool)
  if pred.shape != true.shape:
    raise MetricError(f"digit_f1: pred {pred.shape} vs true {true.shape}")
  tp = np.sum(pred & true, -1)
  denom = np.sum(pred, -1) + np.sum(true, -1)
  return np.where(denom == 0, 1.0, 2.0 * tp / np.maximum(denom, 1))


def _digit_sets(pred, target, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(N, 10) bool pred and target; `target` may be a list of prompts (parsed with `prompt_digits`)."""
  if len(target) and isinstance(target[0], str):
    target = prompts_multi_hot(target)
  pred, target = np.asarray(pred, bool), np.asarray(target, bool)
  if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != NUM_DIGITS:
    raise MetricError(f"{name}: expected (N, 10) pred and target, got {pred.shape} and {target.shape}")
  return pred, target


def clip_set_agreement(pred, target) -> np.ndarray:
  """(N,) bool: whether each clip's predicted digit set equals its prompt's (arguments as `prompt_agreement`)."""
  pred, target = _digit_sets(pred, target, "clip_set_agreement")
  return np.all(pred == target, -1)


def prompt_agreement(pred, target) -> dict[str, float]:
  """Agreement of the evaluator's digit sets with the prompts' digit sets.

  `pred`: (N, 10) bool (or logits > 0); `target`: (N, 10) bool, or a list of prompts (parsed with
  `prompt_digits`). Returns exact-set agreement (fraction of clips whose predicted set equals the prompt's),
  mean per-clip F1 (softer: partial credit), and micro precision / recall over digits.
  """
  pred, target = _digit_sets(pred, target, "prompt_agreement")
  tp = float(np.sum(pred & target))
  return {"set_agreement": float(np.mean(clip_set_agreement(pred, target))),
          "digit_f1": float(np.mean(digit_f1(pred, target))),
          "precision": tp / max(float(np.sum(pred)), 1.0),
          "recall": tp / max(float(np.sum(target)), 1.0)}


# ----------------------------------------------------------------------------------------------------------------------
# Steps and confidences by event label


def by_event(values, labels, event_names: Sequence[str]) -> dict[str, dict[str, float]]:
  """Mean / std / count of a per-frame quantity (N, F) grouped by the frames' event labels (N, F)."""
  v, lab = np.asarray(values, np.float64), np.asarray(labels)
  if v.shape != lab.shape:
    raise MetricError(f"by_event: values {v.shape} vs labels {lab.shape}")
  out = {}
  for i, name in enumerate(event_names):
    sel = v[lab == i]
    out[name] = {"mean": float(sel.mean()) if sel.size else float("nan"),
                 "std": float(sel.std()) if sel.size else float("nan"), "count": int(sel.size)}
  return out


def by_frame(values) -> list[float]:
  """Mean over clips of a per-frame quantity (N, F) -> F floats."""
  return [float(x) for x in np.asarray(values, np.float64).mean(0)]
