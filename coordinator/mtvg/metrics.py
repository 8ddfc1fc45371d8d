"""Metrics of generated moving-digit sequences (MTVG): boundary MSE, estimated motion and repetition.

A sequence is frames (K, F, S, S) in [-1, 1], one clip per segment, with condition ids (K,).
- **Boundary MSE** of transition k (k >= 1): the pixel MSE between segment k-1's last frame and segment k's
  first frame.
- **Estimated motion** of a segment: the (direction, speed) in {right, left, down, up} x {1, 2} whose wrapped
  shift of each frame best predicts the next frame (least pixel MSE summed over the F-1 frame pairs). It is a
  fixed estimator, not a learned one, so it cannot be fooled the way a classifier can.
- **Repetition**, over the transitions k >= 1 whose condition asks for a different direction than segment
  k-1's: the fraction whose estimated direction equals segment k-1's estimated direction, i.e. the next
  segment copies the previous motion instead of following its own condition.
- **Condition accuracy** (with `fedfleet.coordinator.mtvg.clip_classifier`): a segment counts when the classifier's digit
  AND direction both equal its condition.
"""

from __future__ import annotations

import numpy as np

from fedfleet.edge_agent.mtvg.output import boundary_mse, estimate_motion
from fedfleet.edge_agent.nn.video_denoiser import DIRECTIONS

__all__ = ["boundary_mse", "estimate_motion", "motion_accuracy", "repetition"]


def repetition(seqs: np.ndarray, conds: np.ndarray) -> tuple[float, int]:
    """(fraction, number of transitions counted): see the module docstring."""
    n, k = conds.shape
    est = estimate_motion(seqs.reshape(n * k, *seqs.shape[2:]))[0].reshape(n, k)
    want = conds % len(DIRECTIONS)
    changes = want[:, 1:] != want[:, :-1]
    copied = est[:, 1:] == est[:, :-1]
    count = int(changes.sum())
    return (float(copied[changes].mean()) if count else 0.0), count


def motion_accuracy(seqs: np.ndarray, conds: np.ndarray) -> float:
    """Fraction of segments whose estimated direction is the condition's."""
    n, k = conds.shape
    est = estimate_motion(seqs.reshape(n * k, *seqs.shape[2:]))[0].reshape(n, k)
    return float(np.mean(est == conds % len(DIRECTIONS)))
