"""Each builder owns the check of its own inputs: the validator and the builder ask the same
function, so a config the validator passes is one the builder accepts, with the same words."""

import jax
import jax.numpy as jnp
import pytest

from configs import default
from finch_jax import checkpoint, configure, files, optim, sweep
from finch_jax import sharding as shd
from finch_jax.checkpoint import Checkpointer, ResumeMismatch
from finch_jax.data import builders
from finch_jax.lora import lora_problems
from finch_jax.trainer import TrainState
from finch_jax.validate import ConfigError, validate

# ----- the mesh and the runs of a comparison (sharding) ------------------------------------------


def test_mesh_shape_resolves_the_rest_and_names_the_job():
  assert shd.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {
    "data": 4,
    "fsdp": 2,
    "tensor": 1,
  }
  # An axis left out takes make_mesh's default: data -1 (the rest), fsdp 1, tensor 1.
  assert shd.mesh_shape({"fsdp": 2}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match=r"needs 8 devices, the job has 16: set --config.mesh.data"):
    shd.mesh_shape({"data": 8, "fsdp": 1, "tensor": 1}, 16, planned=True)
  with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
    shd.mesh_shape({"model": 2}, 8)
  with pytest.raises(ValueError, match="mesh sizes must be integers"):
    shd.mesh_shape({"data": 2.0}, 8)


def test_make_mesh_and_the_validator_say_the_same():
  with pytest.raises(ValueError) as built:
    shd.make_mesh(data=3, fsdp=1, tensor=1)
  config = default.get_config()
  config.mesh.data = 3
  with pytest.raises(ConfigError) as checked:
    validate(config)
  assert checked.value.problems == [f"mesh={{'data': 3, 'fsdp': 1, 'tensor': 1}}: {built.value}"]


def test_a_mesh_without_data_is_read_as_make_mesh_reads_it():
  """A config's mesh that leaves `data` out gets the devices left over, as `make_mesh` gives
  them; the validator used to read the missing size as 1 and refuse the mesh."""
  config = default.get_config()
  config.mesh = {"fsdp": 2, "tensor": 1}
  assert dict(shd.make_mesh(**config.mesh).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  validate(config)


@pytest.mark.parametrize(
  "wanted, mesh, devices, processes, cores, runs",
  [
    (0, {"data": -1, "fsdp": 1, "tensor": 1}, 8, 1, 2, 2),  # one run per core
    (0, {"data": -1, "fsdp": 1, "tensor": 1}, 8, 1, 3, 2),  # 3 does not divide 8
    (0, {"data": -1, "fsdp": 1, "tensor": 1}, 8, 1, None, 1),  # accelerators: one at a time
    (4, {"data": -1, "fsdp": 2, "tensor": 1}, 8, 1, None, 4),
    (0, {"data": 2, "fsdp": 2, "tensor": 1}, 8, 1, 8, 2),  # each run needs 4 devices
  ],
)
def test_concurrent_runs(wanted, mesh, devices, processes, cores, runs):
  count = shd.concurrent_runs(wanted, mesh, devices, process_count=processes, cpu_cores=cores)
  assert count == runs


def test_concurrent_runs_that_do_not_fit_are_refused_by_the_validator_as_by_the_sweep():
  config = default.get_config()
  config.compare.concurrent_runs = 3
  with pytest.raises(ValueError) as swept:
    sweep.run_device_groups(config)
  assert str(swept.value) == (
    "compare.concurrent_runs=3: 8 devices do not split into 3 equal groups of at least 1 (the "
    "mesh of one run); use a divisor of 8, or 0."
  )
  with pytest.raises(ConfigError) as checked:
    validate(config)
  assert checked.value.problems == [str(swept.value)]
  with pytest.raises(ValueError, match="needs a single process"):
    shd.concurrent_runs(2, {"data": -1}, 8, process_count=2)


# ----- the batch, the tokenizer, datasets, the base checkpoint (configure) -----------------------


def test_batch_problems():
  sizes = {"data": 4, "fsdp": 2, "tensor": 1}
  assert configure.batch_problems(16, 1, sizes, 2) == []
  assert configure.batch_problems(0, 1) == [
    ("data.batch_size", "must be a positive integer: rows per global batch.")
  ]
  (problem,) = configure.batch_problems(12, 1, sizes)
  assert problem == (
    "data.batch_size",
    "does not split over the 8 devices the batch is sharded on (mesh.data=4 x mesh.fsdp=2): "
    "set --config.data.batch_size to a multiple of 8, e.g. 8 or 16.",
  )
  (problem,) = configure.batch_problems(16, 1, sizes, 4, flag=lambda path: f"<{path}>")
  assert "set <data.batch_size> to a multiple of 32, e.g. 32" in problem[1]
  assert "or <grad_accum_steps> to one of [1, 2]" in problem[1]
  # 10 rows among 4 processes, and 2 batch devices among 4 processes; 10 rows over 2 is fine.
  found = configure.batch_problems(10, 4, {"data": 2, "fsdp": 1})
  assert [field for field, _ in found] == ["data.batch_size", "mesh"]


def test_dataset_problems_name_each_field_and_the_datasets_read():
  config = default.get_config()
  config.data.train = {"name": "", "split": "finetun"}
  config.data.eval_sets["retain"]["name"] = "embedded/biografies"
  problems, read = configure.dataset_problems(config)
  assert [field for field, _ in problems] == ["data.train.split", "data.eval_sets.retain.name"]
  assert "no split 'finetun'" in problems[0][1]
  assert read == {"embedded_biographies"}  # the misspelt corpus is not read


def test_base_checkpoint_problems_name_each_field_of_another_model(tmp_path):
  config = default.get_config()
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params={"w": jnp.zeros(2)},
    opt_state={"m": jnp.zeros(2)},
    num_skipped=jnp.zeros([], jnp.int32),
  )
  saver = Checkpointer(
    str(tmp_path / "checkpoints"), save_every=1, config=config.to_dict(), async_save=False
  )
  saver.maybe_save(3, state, force=True)
  saver.close()
  config.base_checkpoint = str(tmp_path)
  assert configure.base_checkpoint_problems(config) == []
  config.model.d_model, config.model.num_layers = 64, 2
  assert [field for field, _ in configure.base_checkpoint_problems(config)] == [
    "model.d_model",
    "model.num_layers",
  ]
  config.base_checkpoint = str(tmp_path / "missing")
  ((field, message),) = configure.base_checkpoint_problems(config)
  assert field == "base_checkpoint" and message.startswith("does not exist: point --config.")


# ----- the optimizer, FINCH and LoRA -------------------------------------------------------------


def test_make_optimizer_refuses_what_the_validator_refuses():
  """b1 = 1 leaves Adam's bias correction dividing by zero: every update NaN, every step
  skipped. The builder refused nothing of the kind before; now it says what the validator says."""
  adamw = {"name": "adamw", "learning_rate": 1e-3, "b1": 1.0}
  assert optim.optimizer_problems(adamw, 10) == [("b1", "must be in [0, 1), e.g. 0.9.")]
  with pytest.raises(ValueError, match=r"^optimizer.b1=1.0: must be in \[0, 1\), e.g. 0.9.$"):
    optim.make_optimizer(adamw, None, 10)
  with pytest.raises(ValueError, match="use 'adamw' or 'sgd'"):
    optim.make_optimizer({"name": "lion", "learning_rate": 1e-3}, None, 10)
  assert optim.optimizer_problems({"name": "sgd"}, 10) == [
    ("learning_rate", "must be set: a positive peak rate, e.g. 1e-3.")
  ]


def test_finch_problems():
  assert optim.finch_problems({"enabled": False, "max_scale": -1.0}) == []
  assert optim.finch_problems({"enabled": True, "reading": "first_k"}) == [
    (
      "reading",
      "reference_steps must be set for reading 'first_k': set finch.reference_steps to "
      "how many first losses to average, e.g. 8.",
    )
  ]
  ((field, message),) = optim.finch_problems({"enabled": True, "max_scale": 0.0})
  assert field == "max_scale"
  assert message.endswith("Set --config.finch.max_scale accordingly (default: 4.0).")


def test_lora_problems_and_the_builder_agree():
  assert lora_problems({"rank": 0}) == []
  assert lora_problems({"rank": -1}) == [("rank", "must be an integer >= 0 (0: LoRA off).")]
  ((field, message),) = lora_problems({"rank": 4, "alpha": 8.0, "targets": ("q_proj", "qkv")})
  assert field == "" and message.startswith("Unknown LoRA targets ['qkv']")
  config = default.get_config()
  config.lora.rank = -1
  with pytest.raises(ValueError, match=r"^lora.rank=-1: must be an integer >= 0"):
    configure.lora_config(config)


# ----- datasets (data.builders) -------------------------------------------------------------------


def test_dataset_splits_and_split_problem():
  splits = builders.dataset_splits("embedded/biographies")
  assert splits["task_facts"] == {"prompt", "answer"} and splits["finetune"] == {"text"}
  assert builders.split_problem("b", "finetune[:10%]", splits, "text") is None
  assert builders.split_problem("b", "test", {"train": {"text"}}) == (
    "dataset 'b' has no split 'test'; it has ['train']."
  )
  assert builders.split_problem("b", "finetune", splits, "facts").startswith(
    "fact sets read prompt/answer records, and split 'finetune' of 'b' has none; use one of"
  )
  assert builders.dataset_splits("lm1b") is None  # a catalog name: only a download would tell


def test_the_builder_and_the_check_refuse_an_unknown_catalog_name_alike(tmp_path):
  with pytest.raises(ValueError) as checked:
    builders.check_catalog_name("no_such_dataset_xyz")
  with pytest.raises(ValueError) as built:
    builders.builder("no_such_dataset_xyz", tmp_path)
  assert str(built.value) == str(checked.value)
  assert "unknown dataset 'no_such_dataset_xyz'" in str(built.value)


# ----- the workdir (files) and resuming (checkpoint) -------------------------------------------


def test_workdir_problem(tmp_path):
  assert files.workdir_problem(str(tmp_path / "new" / "run")) is None
  (tmp_path / "taken").write_text("")
  assert files.workdir_problem(str(tmp_path / "taken")) == (
    "is a file, not a directory: move it or use another --workdir."
  )
  assert files.workdir_problem(str(tmp_path / "taken" / "run")).startswith(
    f"cannot be made: {tmp_path / 'taken'} is a file"
  )


def _state(width):
  return TrainState(
    step=jnp.zeros([], jnp.int32),
    params={"w": jnp.zeros(width)},
    opt_state={"m": jnp.zeros(width)},
    num_skipped=jnp.zeros([], jnp.int32),
  )


def test_restoring_another_state_is_refused_and_the_checkpoint_kept(tmp_path):
  """A checkpoint of other arrays is not damaged: the restore says what differs and leaves it
  where it is (it used to be taken for damage and moved aside to `<step>.damaged`)."""
  directory = tmp_path / "checkpoints"
  saver = Checkpointer(str(directory), save_every=1, async_save=False)
  saver.maybe_save(4, _state(2), force=True)
  saver.close()
  reader = Checkpointer(str(directory), save_every=1, async_save=False)
  try:
    with pytest.raises(ResumeMismatch) as refused:
      reader.restore(_state(3))
    restored = reader.restore(_state(2))  # the state it holds still restores
  finally:
    reader.close()
  assert "params.w: saved float32[2], new float32[3]" in str(refused.value)
  assert "opt_state.m: saved float32[2], new float32[3]" in str(refused.value)
  assert sorted(p.name for p in directory.iterdir()) == ["4"]
  assert int(restored.step) == 4 and restored.params["w"].shape == (2,)


def test_resume_problem(tmp_path):
  assert (
    checkpoint.resume_problem(
      tmp_path, fingerprint=None, config=None, abstract_state=lambda: _state(2)
    )
    is None
  )  # no checkpoint
  saver = Checkpointer(
    str(tmp_path / "checkpoints"), save_every=1, config={"width": 2}, async_save=False
  )
  saver.maybe_save(4, _state(2), force=True)
  saver.close()
  same = checkpoint.resume_problem(
    tmp_path, fingerprint=None, config={"width": 2}, abstract_state=lambda: _state(2)
  )
  assert same is None
  wider = checkpoint.resume_problem(
    tmp_path, fingerprint=None, config={"width": 3}, abstract_state=lambda: _state(3)
  )
  assert wider == (
    "already holds a checkpoint (step 4) of a different training state: 2 arrays differ from the "
    "state this config builds (params.w: saved float32[2], new float32[3]; opt_state.m: saved "
    "float32[2], new float32[3]); changed since it was written: width 2 -> 3. The run would "
    "resume from it and fail to restore it: rerun with the config that wrote it, or use a new "
    "--workdir."
  )
  cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim else x, _state(2))
  assert "cast it to the new dtypes" in checkpoint.resume_problem(
    tmp_path, fingerprint=None, config=None, abstract_state=lambda: cast
  )
