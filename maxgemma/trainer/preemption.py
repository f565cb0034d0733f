"""When the training loop stops for a preemption (it then saves a checkpoint and exits 0).

One process turns SIGTERM into a flag checked between steps.

Several processes must stop at the same step. `jax.distributed.initialize` starts jax's preemption
service in every process (on CPU with gloo as on TPU): it catches SIGTERM (and the TPU maintenance
notice), tells the other processes through the coordinator, and they agree on a sync point one past
the largest counter any of them has passed to `multihost_utils.reached_preemption_sync_point`.
Each process calls it once per step with the number of steps this run has taken (1, 2, ...), the
same in every process since they all resume from the same checkpoint. A counter that restarts with
the run matters: a notice that arrives before the first step (while restoring or compiling) gives
sync point 1, which a count of this run's steps reaches, and the checkpoint's step would not.

orbax's `CheckpointManager.reached_preemption` (asked again inside `save` and by its background
finalizer) is answered from the loop's decision, so the service only ever sees this counter.
"""

from __future__ import annotations

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils

from maxgemma.checkpoint import Checkpointer


class Preemption:
  """`reached(step)`: whether to save at `step` and stop; call it after every step of the run."""

  def __init__(self, ckpt: Checkpointer, start: int):
    self._start = start
    self._flag = False
    self._stop_at: int | None = None
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    ckpt.manager.reached_preemption = self._decided

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting")
    self._flag = True

  def _decided(self, step: int) -> bool:
    return self._flag or self._stop_at == step

  def reached(self, step: int) -> bool:
    if self._multi and self._stop_at is None and self._synced(step - self._start):
      self._stop_at = step
      logging.warning("preemption: every process reached the sync point at step %d (step %d of "
                      "this run)", step, step - self._start)
    return self._decided(step)

  def _synced(self, counter: int) -> bool:
    try:
      return multihost_utils.reached_preemption_sync_point(counter)
    except RuntimeError as e:  # the service is off (jax_enable_preemption_service=False)
      logging.warning("no preemption sync (%s): SIGTERM will not save a checkpoint", e)
      self._multi = False
      return False

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
