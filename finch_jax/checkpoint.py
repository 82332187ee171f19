"""Checkpoints with orbax: parameters, optimizer state, data iterator and config in one step.

`WORKDIR/checkpoints/<step>/` holds the items `params` and `opt_state` (sharded arrays, written
by every process for its own shards), `data` (the Grain iterator state, one file per process),
`meta` (step, skipped steps, and what the fit loop needs to resume its logs exactly) and `config`
(JSON). Saves are asynchronous: training continues while the files are written, and `close()`
waits for the last one. The directory is local or in a bucket (`gs://BUCKET/...`): every path
here is an `etils.epath.Path`, as orbax's own are.

What goes wrong, and what happens then:
- A state holding NaN or inf is never written (`FloatingPointError`); the last good checkpoint
  stays the newest.
- A write that fails (disk full, unwritable directory) raises `CheckpointError` naming the
  directory and the fix, at the save or, for an asynchronous one, at the next save or `close()`.
  On a local disk orbax writes into a temporary directory and renames it when complete; in a
  bucket, which cannot rename a directory at once, it writes the step's objects in place and
  marks the step complete last (`commit_success.txt`), and a step without that mark is not
  listed. Either way the previous checkpoint is untouched, and the leftover is removed when the
  directory is next opened.
- A read that fails for a reason that passes (a bucket that times out, answers 503 or 429, a
  connection reset) is tried again, a few times with growing waits; if it still fails, the
  restore stops with `CheckpointError` and nothing is moved, so no progress is rolled back.
- A checkpoint that cannot be read (a file missing or cut short) is skipped with a warning and
  moved aside to `<step>.damaged`; the newest readable one is restored. When none can be read,
  `CheckpointError` says so rather than starting the run over.
- A checkpoint written by a run of another fingerprint (another config, other data or another
  base model: `finch_jax.configure.fingerprint_record`, stored with every step) is not resumed:
  `ResumeMismatch` names the fields that differ and the fix.
- A checkpoint that holds other arrays (paths or shapes) than the state it is restored into is
  not resumed either, nor taken for damage: `ResumeMismatch` names the arrays (other dtypes are
  cast). `resume_problem` says both before anything is built, for `finch_jax.validate`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from finch_jax import files
from finch_jax import sharding as shd
from finch_jax.trainer import TrainState

T = TypeVar("T")


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none could be read; the message says what to do."""


class ResumeMismatch(CheckpointError):
  """The checkpoint to resume was written by a run of another fingerprint (config, data or base
  model); the message names what differs and the fix."""


# Waits, in seconds, before each new try of a read that failed for a passing reason.
RETRY_DELAYS = (1.0, 4.0, 16.0)
# What a passing failure of a store says (gRPC and HTTP statuses, as TensorStore, gcsfs and the
# Google client libraries word them): another try may succeed. Anything else means the files.
_TRANSIENT_WORDS = (
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "RESOURCE_EXHAUSTED",
  "Service Unavailable",
  "Too Many Requests",
  "Connection reset",
  "Connection aborted",
  "timed out",
)
_TRANSIENT_TYPES = ("ServiceUnavailable", "TooManyRequests", "GatewayTimeout", "DeadlineExceeded")
_TRANSIENT_CODES = (408, 429, 500, 502, 503, 504)


def is_transient(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, is one that passes (a time-out, a
  connection reset, a store that answers 5xx or 429), so the same read may succeed when tried
  again; a missing, short or malformed file is not."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, TimeoutError | ConnectionError):
      return True
    if type(error).__name__ in _TRANSIENT_TYPES:
      return True
    if getattr(error, "code", None) in _TRANSIENT_CODES:
      return True
    if any(word in str(error) for word in _TRANSIENT_WORDS):
      return True
    error = error.__cause__ or error.__context__
  return False


def _absolute(path: str | os.PathLike) -> epath.Path:
  """`path` as orbax wants it: absolute when local (relative to the working directory), as
  given when it is a bucket's (`os.path.abspath` would make `gs://b/x` a local `gs:/b/x`)."""
  return epath.Path(path if files.is_remote(path) else os.path.abspath(path))


def _data_state(directory: epath.Path) -> dict[str, Any]:
  """The data iterator state saved in `directory`, whatever number of processes wrote it.

  Every process walks the same global stream, so all processes save the same state; a run with
  another process count can take any of them.
  """
  mine = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if mine.exists():
    return json.loads(mine.read_text())
  names = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
  states = [json.loads((directory / name).read_text()) for name in names]
  if not states:
    raise FileNotFoundError(f"No data iterator state in {directory}.")
  if any(state != states[0] for state in states[1:]):
    raise ValueError(
      f"{directory} holds a different data iterator state per process ({', '.join(names)}): "
      f"resume it with the number of processes that wrote it, not {jax.process_count()}."
    )
  return states[0]


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
    tree,
  )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _worst_everywhere(outcome: int) -> int:
  """The largest of every process's `outcome` (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return outcome
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.asarray(outcome))))


# What a restore attempt came to, worst last: all processes take the worst any of them saw.
_READ, _DAMAGED, _UNREACHABLE, _MISMATCH = range(4)
_SHOWN_CHANGES = 8


def _outcome(error: BaseException | None) -> int:
  if error is None:
    return _READ
  if isinstance(error, ResumeMismatch):
    return _MISMATCH
  return _UNREACHABLE if is_transient(error) else _DAMAGED


def _changed_fields(saved: Any, now: Any, prefix: str = "") -> list[str]:
  """'seed 0 -> 1', 'data.train.name ... -> ...', 'file /d/a.txt (changed)': where two
  fingerprint inputs (`finch_jax.configure.fingerprint_inputs`) differ."""
  if isinstance(saved, dict) and isinstance(now, dict):
    return [
      change
      for key in sorted(saved.keys() | now.keys(), key=str)
      for change in _changed_fields(saved.get(key), now.get(key), f"{prefix}{key}.")
    ]
  if saved == now:
    return []
  kind, _, name = prefix.rstrip(".").partition(".")
  if kind == "files":
    what = "added" if saved is None else "removed" if now is None else "changed"
    return [f"file {name} ({what})"]
  return [f"{name or kind} {saved!r} -> {now!r}"]


def _shown(changes: list[str], most: int = _SHOWN_CHANGES) -> str:
  """The first `most` of `changes`, and how many more there are."""
  more = f" and {len(changes) - most} more" if len(changes) > most else ""
  return ", ".join(changes[:most]) + more


def _brief(error: BaseException, limit: int = 300) -> str:
  """An error in at most about `limit` characters: TensorStore's carry a whole spec, and name the
  operation at the start and the operating system's reason ("File too large") at the end."""
  text = " ".join(f"{type(error).__name__}: {error}".split())
  if len(text) <= limit:
    return text
  head = limit * 2 // 5
  return f"{text[:head]} ... {text[head - limit :]}"


class Checkpointer:
  """Periodic, asynchronous, multi-host-safe checkpoints of a training run.

  Args:
    directory: where checkpoints go, normally `WORKDIR/checkpoints`; local or `gs://...`.
    save_every: save when the step is a multiple of this (and whenever forced).
    max_to_keep: how many recent checkpoints to keep.
    config: a JSON-able mapping saved with every checkpoint.
    async_save: write in the background.
    fingerprint: what the run is made from (`finch_jax.configure.fingerprint_record`), saved
      with every checkpoint; a checkpoint saved with another is not restored (`ResumeMismatch`).
      None: nothing is saved or checked.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    save_every: int,
    max_to_keep: int = 2,
    config: Mapping[str, Any] | None = None,
    async_save: bool = True,
    fingerprint: Mapping[str, Any] | None = None,
  ):
    self.directory = _absolute(directory)
    self.save_every = save_every
    self.config = dict(config or {})
    self.fingerprint = None if fingerprint is None else dict(fingerprint)
    self.data_iterator = None
    # What the restored checkpoint's `meta` held for the fit loop (see `fit(resume=...)`).
    self.restored_extra: dict[str, Any] = {}
    self._in_flight: int | None = None  # the step of an asynchronous save not yet waited for
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      create=True,
      # A save that failed (disk full, killed mid-write) leaves its temporary directory.
      cleanup_tmp_directories=True,
    )
    try:
      # Orbax would only fail at the first save, steps into the run, when the path is taken.
      # (In a bucket there are no directories to make: this checks nothing, and the validator
      # has checked the bucket before the run started.)
      self.directory.mkdir(parents=True, exist_ok=True)
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise CheckpointError(
        f"Cannot create or open the checkpoint directory {self.directory} ({_brief(e)}): make "
        "it a writable directory (nothing else by that name), or rerun with another --workdir."
      ) from e

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self.manager.latest_step()

  def maybe_save(
    self,
    step: int,
    state: TrainState,
    *,
    force: bool = False,
    extra: Callable[[], Mapping[str, Any]] | None = None,
  ) -> bool:
    """Saves when `step` is due (or `force`); returns whether it saved.

    Args:
      step: the step `state` has reached.
      state: what to save.
      force: save even when `step` is not a multiple of `save_every`.
      extra: returns JSON-able values saved with the step (`restored_extra` after a restore);
        called only when a checkpoint is written.

    Raises:
      FloatingPointError: the state holds NaN or inf; nothing is written.
      CheckpointError: this write, or the previous asynchronous one, failed.
    """
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    self._wait()
    if self.manager.latest_step() == step:
      return False
    if not bool(_all_finite((state.params, state.opt_state))):
      raise FloatingPointError(
        f"Refusing to checkpoint step {step}: the parameters or the optimizer state hold NaN or "
        f"inf. {self.directory} keeps its newest good checkpoint ({self._newest_text()}), and "
        "rerunning resumes from it. Steps with a non-finite loss or gradient are skipped, so a "
        "finite update overflowed: lower optimizer.learning_rate or keep optimizer.grad_clip on."
      )
    meta = {"step": int(step), "num_skipped": int(state.num_skipped)}
    if self.fingerprint is not None:
      meta["fingerprint"] = self.fingerprint
    if extra is not None:
      meta["extra"] = dict(extra())
    items = {
      "params": ocp.args.StandardSave(state.params),
      "opt_state": ocp.args.StandardSave(state.opt_state),
      "meta": ocp.args.JsonSave(meta),
      "config": ocp.args.JsonSave(self.config),
    }
    if self.data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(self.data_iterator)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # The filesystem's error, often wrapped by orbax or TensorStore.
      raise self._write_error(step, e) from e
    self._in_flight = step
    return True

  def _wait(self) -> None:
    """Waits for the asynchronous save in flight; its failure is raised here, not lost."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(step, e) from e

  def _write_error(self, step: int | None, error: BaseException) -> CheckpointError:
    which = "a checkpoint" if step is None else f"the checkpoint of step {step}"
    if files.is_remote(self.directory):
      fix = (
        "Check the network and that these credentials may still write to that bucket (or rerun "
        "with another --workdir)"
      )
    else:
      fix = (
        "Free space on that disk or make the directory writable (or rerun with --workdir on a "
        "disk with room)"
      )
    return CheckpointError(
      f"Could not write {which} to {self.directory} ({_brief(error)}). {fix}, then rerun the "
      f"same command: it resumes from {self._newest_text(exclude=step)}, which this failure left "
      "intact."
    )

  def _newest_text(self, exclude: int | None = None) -> str:
    try:
      self.manager.reload()  # The failed step may still be listed in memory.
      steps = [s for s in self.manager.all_steps() if s != exclude]
    except Exception:  # The same broken disk may fail this too; the message still helps.
      return "the newest complete checkpoint"
    return f"step {max(steps)}" if steps else "step 0 (no checkpoint was complete yet)"

  def restore(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
    """The state saved at `step` (default: the newest readable), laid out as `abstract_state`.

    The data iterator set with `data_iterator` is restored in place as well, and
    `restored_extra` is set to what the checkpoint's `extra` held.

    A read that fails for a passing reason (`is_transient`) is tried again after each wait of
    `RETRY_DELAYS`. Without `step`, checkpoints are tried newest first. One that cannot be read
    (a file missing or cut short) is skipped with a warning naming it and why, and once an older
    one restores, the skipped ones are moved aside to `<step>.damaged` in the same directory
    (kept for inspection, and out of the way of the run writing those steps again).

    Raises:
      FileNotFoundError: the directory holds no checkpoint.
      ResumeMismatch: the checkpoint was saved by a run of another fingerprint, or holds other
        arrays than `abstract_state`; nothing is moved.
      CheckpointError: none of its checkpoints can be read, or one still fails for a passing
        reason after the last try; nothing is moved or changed.
    """
    if step is not None:
      return self._read(abstract_state, step)
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    failed: list[tuple[int, Exception]] = []
    for candidate in steps:
      error: Exception | None = None
      try:
        state = self._read(abstract_state, candidate)
      except Exception as e:  # Damage shows up as many error types (TensorStore, JSON, orbax).
        error = e
      # All processes act alike: a file read by one process only may be the one that failed.
      outcome = _worst_everywhere(_outcome(error))
      if outcome == _MISMATCH:
        raise (
          error
          if isinstance(error, ResumeMismatch)
          else ResumeMismatch(
            f"Another process found checkpoint step {candidate} in {self.directory} saved by a "
            "run of another fingerprint."
          )
        )
      if outcome == _UNREACHABLE:
        reason = _brief(error) if error is not None else "on another process"
        raise CheckpointError(
          f"Checkpoint step {candidate} in {self.directory} could not be read after "
          f"{len(RETRY_DELAYS) + 1} tries ({reason}): the store did not answer, which passes. "
          "Nothing was moved or changed; rerun the same command once it answers (check the "
          "network and the store's status)."
        ) from error
      if outcome == _DAMAGED:
        error = error or CheckpointError("another process could not read it")
        logging.warning(
          "Skipping checkpoint step %d in %s: it cannot be read (%s).",
          candidate,
          self.directory,
          _brief(error),
        )
        failed.append((candidate, error))
        continue
      if failed:
        moved = self._set_aside([s for s, _ in failed])
        logging.warning(
          "Resumed from step %d, the newest readable checkpoint in %s; moved the unreadable "
          "ones aside: %s.",
          candidate,
          self.directory,
          ", ".join(moved),
        )
      return state
    reasons = "; ".join(f"step {s}: {_brief(e, 200)}" for s, e in failed)
    raise CheckpointError(
      f"No checkpoint in {self.directory} can be read ({reasons}). Nothing was changed, and the "
      "run did not start over. If the configuration changed since they were written, rerun with "
      "the old one or another --workdir; otherwise move that directory away (or put back a good "
      "copy of a checkpoint) to start from step 0."
    ) from failed[0][1]

  def check_resume(self) -> None:
    """Raises `ResumeMismatch` when the newest checkpoint was saved by a run of another
    fingerprint; does nothing when there is none, when it cannot be read here (`restore` deals
    with that) or when this checkpointer has no fingerprint. Cheap (it reads the step's `meta`),
    so a run calls it before building data or compiling. All processes must call it."""
    step = self.latest_step()
    if step is None or self.fingerprint is None:
      return
    error: ResumeMismatch | None = None
    with contextlib.suppress(Exception):  # unreadable: `restore` retries, or skips it as damaged
      error = _mismatch(self.directory, step, self._saved_meta(step), self.fingerprint)
    if _worst_everywhere(_outcome(error)) == _MISMATCH:
      raise error or ResumeMismatch(
        f"Another process found checkpoint step {step} in {self.directory} saved by a run of "
        "another fingerprint."
      )

  def _read(self, abstract_state: TrainState, step: int) -> TrainState:
    """`_restore_step`, retried while it fails for a passing reason (`retried`)."""
    return retried(
      lambda: self._restore_step(abstract_state, step),
      f"checkpoint step {step} in {self.directory}",
    )

  def _saved_meta(self, step: int) -> dict[str, Any]:
    """The `meta` item of checkpoint `step`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def _check_fingerprint(self, step: int, meta: Mapping[str, Any]) -> None:
    """Raises `ResumeMismatch` when `meta` was saved with another fingerprint than this one."""
    if self.fingerprint is None:
      return
    if meta.get("fingerprint") is None:
      logging.warning(
        "Checkpoint step %d in %s was saved before checkpoints kept their run's fingerprint: "
        "resuming it without checking that the config and data are the same.",
        step,
        self.directory,
      )
      return
    error = _mismatch(self.directory, step, meta, self.fingerprint)
    if error is not None:
      raise error

  def _check_arrays(self, step: int, abstract_state: TrainState) -> None:
    """Raises `ResumeMismatch` when checkpoint `step` holds another tree or other shapes of
    arrays than `abstract_state` (other dtypes are cast); orbax would fail to restore it, and
    the checkpoint is not damaged."""
    saved = saved_arrays(self.directory, step)
    if saved is None:  # unreadable metadata: the restore itself says what is wrong
      return
    built = state_arrays(abstract_state)
    difference = state_difference(saved, built)
    if difference is not None and not is_cast(saved, built):
      raise ResumeMismatch(
        f"{self.directory} holds checkpoint step {step} of another training state: {difference}."
        " Rerun with the config that wrote it, or use a new --workdir."
      )

  def _restore_step(self, abstract_state: TrainState, step: int) -> TrainState:
    self._check_fingerprint(step, self._saved_meta(step))
    self._check_arrays(step, abstract_state)
    items = {
      "params": ocp.args.StandardRestore(_abstract(abstract_state.params)),
      "opt_state": ocp.args.StandardRestore(_abstract(abstract_state.opt_state)),
      "meta": ocp.args.JsonRestore(),
    }
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if self.data_iterator is not None:
      # Read by hand rather than with Grain's handler, which only looks for the file of this
      # process count: a checkpoint then resumes with another number of processes too.
      self.data_iterator.set_state(_data_state(self.directory / str(step) / "data"))
    meta = restored["meta"]
    replicated = abstract_state.step.sharding
    self.restored_extra = dict(meta.get("extra", {}))
    return TrainState(
      step=jax.device_put(jnp.asarray(meta["step"], jnp.int32), replicated),
      params=restored["params"],
      opt_state=restored["opt_state"],
      # Checkpoints from before skipped steps were counted hold no count: 0.
      num_skipped=jax.device_put(jnp.asarray(meta.get("num_skipped", 0), jnp.int32), replicated),
    )

  def _set_aside(self, steps: list[int]) -> list[str]:
    """Renames the step directories to `<step>.damaged` (`-2`, ... when taken; orbax ignores
    such names): process 0 renames, then every process waits for it, so none opens a step that
    is being moved.

    In a bucket a rename is a copy of each object and a delete: slower, and not atomic, but the
    damaged step is unreadable anyway and the copy is for inspection only.
    """
    moved = []
    for step in steps:
      source = self.directory / str(step)
      if jax.process_index() == 0:
        moved.append(str(files.set_aside(source, ".damaged")))
      else:
        moved.append(f"{source}.damaged")
    shd.barrier("finch_jax.checkpoint.set_aside")
    self.manager.reload()
    return moved

  def close(self) -> None:
    """Waits for pending writes and releases the manager.

    Raises:
      CheckpointError: the last asynchronous save failed.
    """
    try:
      self._wait()
    except CheckpointError:
      # Orbax raises the failure of a save's last phase (in a bucket: its metadata, written by
      # a thread of its own) again when closed; the error above already says it, and what to do.
      with contextlib.suppress(Exception):
        self.manager.close()
      raise
    self.manager.close()


def _mismatch(
  directory: epath.Path, step: int, meta: Mapping[str, Any], fingerprint: Mapping[str, Any]
) -> ResumeMismatch | None:
  """The refusal to resume step `step`, whose `meta` is given, under `fingerprint`; None when
  it was saved with the same fingerprint or with none."""
  saved = meta.get("fingerprint")
  if saved is None or saved.get("fingerprint") == fingerprint.get("fingerprint"):
    return None
  shown = _shown(_changed_fields(saved.get("inputs"), fingerprint.get("inputs")))
  workdir = directory.parent if directory.name == "checkpoints" else directory
  return ResumeMismatch(
    f"{directory} holds checkpoint step {step} of another run; changed since it was written: "
    f"{shown or 'what the run is made from'}. Resuming it would continue that run as if it "
    "were this one. Rerun with the config and data that wrote it, or use a new --workdir; to "
    f"start this config over in the same workdir, move the old run aside first (mv {workdir} "
    f"{workdir}.old)."
  )


def resume_mismatch(
  directory: str | os.PathLike, step: int, fingerprint: Mapping[str, Any]
) -> ResumeMismatch | None:
  """Why checkpoint `step` in `directory` may not be resumed by a run of `fingerprint`
  (`finch_jax.configure.fingerprint_record`), as `Checkpointer.restore` would refuse it; None
  when it may, when it was saved before checkpoints kept fingerprints, or when its `meta` cannot
  be read here. Reads one small file, for checks before anything is built (`finch_jax.validate`)."""
  directory = _absolute(directory)
  try:
    meta = json.loads((directory / str(step) / "meta" / "metadata").read_text())
  except (OSError, ValueError):
    return None
  return _mismatch(directory, step, meta, fingerprint) if isinstance(meta, dict) else None


def checkpoints_dir(path: str | os.PathLike) -> epath.Path:
  """Where the checkpoints of `path` are: its `checkpoints/` folder when it is a workdir that
  has one, else `path` itself (as given: relative stays relative)."""
  path = epath.Path(path)
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def saved_steps(path: str | os.PathLike) -> tuple[str, list[int] | None] | None:
  """(checkpoints folder, its finished steps, sorted) of a workdir or `checkpoints/` folder.

  None when nothing exists at `path`; steps None when the store cannot be listed from here (a
  bucket without its file-system package): the run itself then says what is wrong.
  """
  try:
    if not epath.Path(path).exists():
      return None
    directory = checkpoints_dir(path)
    if not directory.is_dir():
      return str(directory), []
    return str(directory), sorted(ocp.utils.checkpoint_steps(directory))
  except (OSError, ValueError, ImportError):
    return str(path), None


def saved_config(directory: str | os.PathLike, step: int) -> dict[str, Any] | None:
  """The config saved with checkpoint `step` (`Checkpointer(config=...)`), if readable."""
  try:
    saved = json.loads((epath.Path(directory) / str(step) / "config" / "metadata").read_text())
  except (OSError, ValueError):
    return None
  return saved if isinstance(saved, dict) else None


# The checkpoint items that hold the train state's arrays.
_STATE_ITEMS = ("params", "opt_state")
_SHOWN_ARRAYS = 3  # differing arrays a refusal names


def saved_arrays(directory: str | os.PathLike, step: int) -> dict[str, tuple[Any, ...]] | None:
  """{'params.PATH' or 'opt_state.PATH': (shape, dtype)} of checkpoint `step`, from the
  metadata orbax writes beside the arrays (nothing is read into memory); None if unreadable."""
  arrays = {}
  handler = ocp.StandardCheckpointHandler()
  try:
    for item in _STATE_ITEMS:
      tree = handler.metadata(epath.Path(directory) / str(step) / item).tree
      for key, leaf in ocp.tree.to_flat_dict(tree, sep=".").items():
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):  # empty nodes are None
          arrays[f"{item}.{key}"] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  except (OSError, ValueError, KeyError, TypeError):
    return None
  finally:
    handler.close()
  return arrays


def state_arrays(state: TrainState) -> dict[str, tuple[Any, ...]]:
  """The same as `saved_arrays` for a train state, real or abstract (`Trainer.abstract_state`)."""
  return {
    f"{item}.{key}": (tuple(leaf.shape), np.dtype(leaf.dtype))
    for item in _STATE_ITEMS
    for key, leaf in ocp.tree.to_flat_dict(getattr(state, item), sep=".").items()
  }


def state_difference(
  saved: Mapping[str, tuple[Any, ...]], built: Mapping[str, tuple[Any, ...]]
) -> str | None:
  """What differs between the arrays of a checkpoint (`saved_arrays`) and of the state a run
  builds (`state_arrays`): 'N arrays differ ... (PATH: saved float32[96, 64], new none; ...)',
  the parameters named first; None when nothing does. Orbax restores a state only into the same
  tree of arrays, and casts one of other dtypes (`is_cast`)."""
  paths = sorted(saved.keys() | built.keys(), key=lambda k: (not k.startswith("params."), k))
  paths = [path for path in paths if saved.get(path) != built.get(path)]
  if not paths:
    return None

  def shown(leaf: tuple[Any, ...] | None) -> str:
    return "none" if leaf is None else f"{leaf[1]}{list(leaf[0])}"

  named = [f"{k}: saved {shown(saved.get(k))}, new {shown(built.get(k))}" for k in paths]
  more = len(named) - _SHOWN_ARRAYS
  listed = "; ".join(named[:_SHOWN_ARRAYS]) + (f"; and {more} more" if more > 0 else "")
  return f"{len(named)} arrays differ from the state this config builds ({listed})"


def is_cast(saved: Mapping[str, tuple[Any, ...]], built: Mapping[str, tuple[Any, ...]]) -> bool:
  """Whether the two sets of arrays differ in dtypes only: a restore casts them."""
  return saved.keys() == built.keys() and all(saved[k][0] == built[k][0] for k in saved)


def resume_problem(
  path: str | os.PathLike,
  *,
  fingerprint: Mapping[str, Any] | None,
  config: Mapping[str, Any] | None,
  abstract_state: Callable[[], TrainState | None],
) -> str | None:
  """Why a run may not resume the newest checkpoint in `path` (a workdir or its checkpoints
  folder), found without building or restoring anything; None when it may, or when there is
  none.

  The checkpoint must have been saved with the run's `fingerprint` (`resume_mismatch`; None
  skips this), and hold the arrays (paths, shapes, dtypes) of the state the run builds
  (`abstract_state()`, called only when there is a checkpoint; it returns None when the state
  cannot be built). `config` is the run's config as JSON, to name what changed since the
  checkpoint was written.
  """
  found = saved_steps(path)
  if not found or not found[1]:
    return None
  directory, step = found[0], max(found[1])
  if fingerprint is not None and (mismatch := resume_mismatch(directory, step, fingerprint)):
    return str(mismatch)
  saved = saved_arrays(directory, step)
  state = abstract_state() if saved is not None else None
  if state is None:
    return None  # unreadable here (the run tries the older steps), or a config to fix first
  built = state_arrays(state)
  difference = state_difference(saved, built)
  if difference is None:
    return None
  outcome = (
    "cast it to the new dtypes, continuing in another precision"
    if is_cast(saved, built)
    else "fail to restore it"
  )
  written = saved_config(directory, step)
  changes = _changed_fields({"config": written}, {"config": config}) if written and config else []
  changed = f"; changed since it was written: {_shown(changes, 5)}" if changes else ""
  return (
    f"already holds a checkpoint (step {step}) of a different training state: {difference}"
    f"{changed}. The run would resume from it and {outcome}: rerun with the config that wrote "
    "it, or use a new --workdir."
  )


def retried(read: Callable[[], T], what: str) -> T:
  """`read()`, tried again after each wait of `RETRY_DELAYS` while it fails for a passing reason
  (`is_transient`); any other error, a `ResumeMismatch` or the last try's error is raised."""
  for delay in (*RETRY_DELAYS, None):
    try:
      return read()
    except ResumeMismatch:
      raise
    except Exception as error:
      if delay is None or not is_transient(error):
        raise
      logging.warning(
        "Reading %s failed for a passing reason (%s); trying again in %g s.",
        what,
        _brief(error),
        delay,
      )
      time.sleep(delay)
  raise AssertionError("unreachable")


def restore_params(
  directory: str | os.PathLike, abstract_params: Any, step: int | None = None
) -> Any:
  """Only the parameters of a checkpoint (e.g. a base model to fine-tune), sharded as asked.

  Args:
    directory: a `checkpoints/` folder, or a workdir that contains one; local or `gs://...`.
    abstract_params: `jax.ShapeDtypeStruct`s with shardings, e.g. from `Trainer`.
    step: which step; the latest by default.

  Raises:
    FileNotFoundError: naming the directory when it holds no checkpoint.
    CheckpointError: naming the step when it cannot be read (a read that fails for a passing
      reason is retried first, `retried`). A base model does not fall back to an older step:
      fine-tuning another base than the one asked for would mislead.
  """
  path = checkpoints_dir(directory)
  directory = str(path)  # as given, in the messages
  if not path.is_dir():
    raise FileNotFoundError(
      f"Base checkpoint {directory!r} does not exist: point --config.base_checkpoint at a "
      "workdir (or its checkpoints/ folder) written by a pretraining run."
    )
  with ocp.CheckpointManager(_absolute(path)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
        f"No checkpoint in {directory!r}: run pretraining there first, or fix "
        "--config.base_checkpoint."
      )
    args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(abstract_params)))
    try:
      restored = retried(
        lambda: manager.restore(step, args=args), f"base checkpoint step {step} in {directory}"
      )
    except Exception as e:
      raise CheckpointError(
        f"Base checkpoint step {step} in {directory!r} cannot be read ({_brief(e)}). Rerun the "
        "pretraining there (it resumes from its newest readable checkpoint), or point "
        "--config.base_checkpoint at another base."
      ) from e
  return restored["params"]
