"""Checkpoints with orbax: parameters, optimizer state, data iterator and config in one step.

`WORKDIR/checkpoints/<step>/` holds the items `params` and `opt_state` (sharded arrays, written
by every process for its own shards), `data` (the Grain iterator state, one file per process),
`meta` (step) and `config` (JSON). Saves are asynchronous: training continues while the files
are written, and `close()` waits for the last one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from finch_jax.trainer import TrainState


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
    tree,
  )


class Checkpointer:
  """Periodic, asynchronous, multi-host-safe checkpoints of a training run.

  Args:
    directory: where checkpoints go, normally `WORKDIR/checkpoints`.
    save_every: save when the step is a multiple of this (and whenever forced).
    max_to_keep: how many recent checkpoints to keep.
    config: a JSON-able mapping saved with every checkpoint.
    async_save: write in the background.
  """

  def __init__(
    self,
    directory: str,
    *,
    save_every: int,
    max_to_keep: int = 2,
    config: Mapping[str, Any] | None = None,
    async_save: bool = True,
  ):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self.config = dict(config or {})
    self.data_iterator = None
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
      ),
    )

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self.manager.latest_step()

  def maybe_save(self, step: int, state: TrainState, *, force: bool = False) -> bool:
    """Saves when `step` is due (or `force`); returns whether it saved."""
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    if self.manager.latest_step() == step:
      return False
    items = {
      "params": ocp.args.StandardSave(state.params),
      "opt_state": ocp.args.StandardSave(state.opt_state),
      "meta": ocp.args.JsonSave({"step": int(step)}),
      "config": ocp.args.JsonSave(self.config),
    }
    if self.data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(self.data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    return True

  def restore(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
    """The state saved at `step` (default: the latest), laid out as `abstract_state` says.

    The data iterator set with `data_iterator` is restored in place as well.
    """
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    items = {
      "params": ocp.args.StandardRestore(_abstract(abstract_state.params)),
      "opt_state": ocp.args.StandardRestore(_abstract(abstract_state.opt_state)),
      "meta": ocp.args.JsonRestore(),
    }
    if self.data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(self.data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return TrainState(
      step=jax.device_put(
        jax.numpy.asarray(restored["meta"]["step"], jax.numpy.int32),
        abstract_state.step.sharding,
      ),
      params=restored["params"],
      opt_state=restored["opt_state"],
    )

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """Only the parameters of a checkpoint (e.g. a base model to fine-tune), sharded as asked.

  Args:
    directory: a `checkpoints/` folder, or a workdir that contains one.
    abstract_params: `jax.ShapeDtypeStruct`s with shardings, e.g. from `Trainer`.
    step: which step; the latest by default.

  Raises:
    FileNotFoundError: naming the directory when it holds no checkpoint.
  """
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"Base checkpoint {directory!r} does not exist: point --config.base_checkpoint at a "
      "workdir (or its checkpoints/ folder) written by a pretraining run."
    )
  with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
        f"No checkpoint in {directory!r}: run pretraining there first, or fix "
        "--config.base_checkpoint."
      )
    restored = manager.restore(
      step,
      args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(abstract_params))),
    )
  return restored["params"]
