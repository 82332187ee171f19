"""A workdir resumes only the run that made it: another config, other data or another base is
refused by name; a passing read error is retried rather than taken for damage; the base model's
samples are cached under everything that made them."""

import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from finch_jax import checkpoint, configure, evaluate, experiment, inputs, run
from finch_jax.checkpoint import Checkpointer, CheckpointError, ResumeMismatch
from finch_jax.trainer import TrainState
from finch_jax.validate import ConfigError, validate
from tests.integration.test_trainer import small_config

# ----- a single run refuses a workdir of another run -------------------------------------------


def _pretrain_config(**changes):
  return small_config(
    mode="pretrain",
    num_train_steps=2,
    checkpoint_every=2,
    eval_every=0,
    **{"data.eval_sets": {}, "data.fact_sets": {}, **changes},
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 2-step run: (its config, its workdir, the trainer that ran it)."""
  config = _pretrain_config(**{"data.data_dir": str(tmp_path_factory.mktemp("data"))})
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer = configure.make_trainer(config)
  run.run_training(config, workdir, trainer=trainer, progress=False)
  return config, workdir, trainer


@pytest.mark.parametrize(
  "change, named",
  [
    ({"seed": 1}, "seed 0 -> 1"),
    ({"data.train": {"name": "", "split": "retain_eval"}}, "data.train.split 'finetune' -> "),
    ({"replay.share": 0.25}, "replay.share 0.0 -> 0.25"),
    ({"optimizer.learning_rate": 3e-3}, "optimizer.learning_rate 0.001 -> 0.003"),
  ],
  ids=["seed", "data.train", "replay", "learning_rate"],
)
def test_a_run_refuses_the_checkpoints_of_another_config(trained, tmp_path, change, named):
  config, workdir, _ = trained
  copy = shutil.copytree(workdir, tmp_path / "run")
  changed = configure.override(config, {})
  changed.update_from_flattened_dict(change)
  with pytest.raises(ResumeMismatch) as refused:
    run.run_training(changed, str(copy), progress=False)
  message = str(refused.value)
  assert f"{copy / 'checkpoints'} holds checkpoint step 2 of another run" in message
  assert named in message
  assert "use a new --workdir" in message and f"mv {copy} {copy}.old" in message
  assert sorted(os.listdir(copy / "checkpoints")) == ["2"]  # nothing moved or written


def test_train_and_evaluate_names_the_change_before_anything_runs(trained, tmp_path):
  """What `python train.py` runs: the validator reports the refused resume with the others."""
  config, workdir, _ = trained
  copy = shutil.copytree(workdir, tmp_path / "run")
  changed = configure.override(config, {"seed": 1})
  with pytest.raises(ConfigError, match=r"--workdir=.*holds checkpoint step 2 of another run.*"):
    experiment.train_and_evaluate(changed, str(copy))
  with pytest.raises(ConfigError, match="seed 0 -> 1"):
    validate(changed, str(copy))
  validate(config, str(copy))  # its own config: no problem


def test_the_same_config_resumes_its_own_checkpoint(trained, tmp_path):
  config, workdir, trainer = trained
  copy = shutil.copytree(workdir, tmp_path / "run")
  result = run.run_training(config, str(copy), trainer=trainer, progress=False)
  assert int(result.state.step) == 2  # resumed at the end: nothing trained again
  # A longer run, logged and evaluated at other intervals, still resumes its own checkpoints.
  longer = configure.override(config, {"num_train_steps": 3, "log_every": 3, "eval_every": 3})
  result = run.run_training(longer, str(copy), trainer=trainer, progress=False)
  assert int(result.state.step) == 3


def test_a_fine_tune_refuses_another_base_of_the_same_shape(trained, tmp_path):
  """LoRA adapters or weights fine-tuned from one base must not resume on another: the base's
  path and the files of its checkpoint are part of the run's fingerprint."""
  config, pretrained, trainer = trained
  base = str(shutil.copytree(pretrained, tmp_path / "base"))
  other = str(shutil.copytree(pretrained, tmp_path / "other_base"))
  finetune = configure.override(config, {"mode": "finetune", "base_checkpoint": base})
  workdir = str(tmp_path / "finetune")
  params = trainer.init_params(0)
  run.run_training(finetune, workdir, trainer=trainer, init_params=params, progress=False)
  moved = configure.override(finetune, {"base_checkpoint": other})
  with pytest.raises(ResumeMismatch, match=re.escape(f"base_checkpoint '{base}' -> '{other}'")):
    run.run_training(moved, workdir, trainer=trainer, init_params=params, progress=False)
  # The same path, but the base was trained further (its checkpoint files changed).
  metadata = os.path.join(base, "checkpoints", "2", "_CHECKPOINT_METADATA")
  with open(metadata, "a") as f:  # its content, not only its time (a copy keeps the content)
    f.write(" ")
  with pytest.raises(ResumeMismatch, match=r"file .*_CHECKPOINT_METADATA \(changed\)"):
    run.run_training(finetune, workdir, trainer=trainer, init_params=params, progress=False)


# ----- a passing read error is retried ---------------------------------------------------------


def _state(value: float, step: int) -> TrainState:
  return TrainState(
    step=jnp.asarray(step, jnp.int32),
    params={"w": jnp.full((4,), value, jnp.float32)},
    opt_state={"m": jnp.full((4,), value / 2, jnp.float32)},
    num_skipped=jnp.asarray(0, jnp.int32),
  )


@pytest.fixture
def two_steps(tmp_path, monkeypatch):
  """A checkpoint directory with steps 1 and 2, and no wait between tries."""
  monkeypatch.setattr(checkpoint, "RETRY_DELAYS", (0.0, 0.0, 0.0), raising=False)
  directory = str(tmp_path / "checkpoints")
  saver = Checkpointer(directory, save_every=1, max_to_keep=5, async_save=False)
  saver.maybe_save(1, _state(1.0, 1))
  saver.maybe_save(2, _state(2.0, 2))
  saver.close()
  return directory


def _failing(times: int, error: Exception, monkeypatch):
  """Makes the next `times` reads of any step raise `error`; returns the list of steps tried."""
  real = Checkpointer._restore_step
  tried = []

  def restore_step(self, abstract_state, step):
    tried.append(step)
    if len(tried) <= times:
      raise error
    return real(self, abstract_state, step)

  monkeypatch.setattr(Checkpointer, "_restore_step", restore_step)
  return tried


def test_a_passing_error_on_the_newest_step_is_retried_not_taken_for_damage(
  two_steps, monkeypatch, caplog
):
  # As gcsfs words a bucket that did not answer once.
  tried = _failing(1, ConnectionError("503 Service Unavailable"), monkeypatch)
  checkpointer = Checkpointer(two_steps, save_every=0)
  with caplog.at_level(logging.WARNING):
    state = checkpointer.restore(_state(0.0, 0))
  checkpointer.close()
  assert int(state.step) == 2 and float(state.params["w"][0]) == 2.0  # no progress lost
  assert tried == [2, 2]
  assert sorted(os.listdir(two_steps)) == ["1", "2"]  # nothing set aside
  assert "failed for a passing reason" in caplog.text


def test_a_store_that_stays_away_stops_the_run_and_moves_nothing(two_steps, monkeypatch):
  tried = _failing(10, TimeoutError("read timed out"), monkeypatch)
  checkpointer = Checkpointer(two_steps, save_every=0)
  with pytest.raises(CheckpointError, match="step 2 .* could not be read after 4 tries"):
    checkpointer.restore(_state(0.0, 0))
  checkpointer.close()
  assert tried == [2, 2, 2, 2]
  assert sorted(os.listdir(two_steps)) == ["1", "2"]


def test_damage_still_falls_back_to_the_older_step(two_steps, monkeypatch):
  _failing(1, ValueError("DATA_LOSS: unexpected end of file"), monkeypatch)
  checkpointer = Checkpointer(two_steps, save_every=0)
  state = checkpointer.restore(_state(0.0, 0))
  checkpointer.close()
  assert int(state.step) == 1
  assert sorted(os.listdir(two_steps)) == ["1", "2.damaged"]


def test_which_errors_pass():
  assert checkpoint.is_transient(TimeoutError())
  assert checkpoint.is_transient(ValueError("UNAVAILABLE: connection refused by the store"))
  wrapped = RuntimeError("restore failed")
  wrapped.__cause__ = ConnectionResetError()
  assert checkpoint.is_transient(wrapped)
  assert not checkpoint.is_transient(FileNotFoundError("params/ocdbt.process_0/d/abc"))
  assert not checkpoint.is_transient(ValueError("DATA_LOSS: unexpected end of file at step 503"))


# ----- the base model's samples ----------------------------------------------------------------


def _samples_config(**changes):
  return small_config(
    mode="finetune",
    **{
      "data.eval_sets": {"retain": {"name": "base_samples", "split": "samples"}},
      "data.fact_sets": {},
      "replay.num_samples": 4,
      "replay.sample_len": 8,
      **changes,
    },
  )


def _retain_tokens(config, workdir, trainer, base) -> list[np.ndarray]:
  evaluator = evaluate.Evaluator(config, str(workdir), trainer, base=base)
  return [np.asarray(b["inputs"]) for b in evaluator.loss_sets["retain"]]


@pytest.mark.parametrize(
  "change",
  [{"replay.num_samples": 6}, {"replay.temperature": 0.5}, {"replay.sample_len": 12}],
  ids=["count", "temperature", "length"],
)
def test_cached_base_samples_are_not_reused_for_other_samples(tmp_path, change):
  config = _samples_config()
  trainer = configure.make_trainer(config)
  base = trainer.init_params(0)
  _retain_tokens(config, tmp_path / "run", trainer, base)  # draws and caches the first ones
  changed = configure.override(config, {})
  changed.update_from_flattened_dict(change)
  reused = _retain_tokens(changed, tmp_path / "run", trainer, base)
  fresh = _retain_tokens(changed, tmp_path / "fresh", trainer, base)
  assert len(reused) == len(fresh)
  for got, want in zip(reused, fresh, strict=True):
    np.testing.assert_array_equal(got, want)


def test_cached_base_samples_are_reused_for_the_same_samples(tmp_path, monkeypatch):
  config = _samples_config()
  trainer = configure.make_trainer(config)
  base = trainer.init_params(0)
  first = inputs.base_model_samples(config, trainer, base, seed=3, cache_dir=tmp_path)
  monkeypatch.setattr(inputs, "sample_replay_set", lambda *a, **k: pytest.fail("drawn again"))
  again = inputs.base_model_samples(config, trainer, base, seed=3, cache_dir=tmp_path)
  assert [a.tolist() for a in again] == [a.tolist() for a in first]
  assert jax.tree.structure(first) == jax.tree.structure(again)


def test_a_base_checkpoint_read_that_fails_for_a_passing_reason_is_retried(two_steps, monkeypatch):
  real, tried = ocp.CheckpointManager.restore, []

  def restore(self, step, *args, **kwargs):
    tried.append(step)
    if len(tried) == 1:
      raise ConnectionError("503 Service Unavailable")
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), _state(0.0, 0).params
  )
  params = checkpoint.restore_params(two_steps, abstract)
  assert tried == [2, 2] and float(params["w"][0]) == 2.0
  tried.clear()

  def damaged(self, step, *args, **kwargs):
    tried.append(step)
    raise ValueError("DATA_LOSS: unexpected end of file")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", damaged)
  with pytest.raises(checkpoint.CheckpointError, match="Base checkpoint step 2"):
    checkpoint.restore_params(two_steps, abstract)
  assert tried == [2]  # an error that means the files is not retried
