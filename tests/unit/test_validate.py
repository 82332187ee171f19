"""validate(): a bad configuration fails before any compilation, naming the field and the fix."""

import contextlib
import dataclasses
import glob
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from configs import default
from finch_jax import configure, plan
from finch_jax import sharding as shd
from finch_jax.checkpoint import Checkpointer
from finch_jax.trainer import TrainState
from finch_jax.validate import ConfigError, validate

ROOT = pathlib.Path(__file__).parents[2]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")

# Compilation reports these events; tracing alone (nnx.eval_shape) does not.
COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_to_mlir")
_compiles: list[str] = []
_listening = False


def _on_event(event, duration, **kwargs):
  if _listening and event.startswith(COMPILE_EVENTS):
    _compiles.append(event)


@contextlib.contextmanager
def no_compilation():
  """Fails the test if anything is lowered or compiled inside the block."""
  global _listening
  _compiles.clear()
  _listening = True
  # Registered for the block only: other libraries may clear every listener (Tunix's metrics
  # logger does when it closes).
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  try:
    yield
  finally:
    _listening = False
    jax.monitoring.unregister_event_duration_listener(_on_event)
  assert not _compiles, f"validate compiled: {_compiles}"


def config_with(base=None, **changes):
  """`base` (default: configs/default.py) with dotted-path changes, e.g. data__batch_size=12."""
  config = base or default.get_config()
  for key, value in changes.items():
    node = config
    *path, last = key.split("__")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def problems(config, workdir=None, **kwargs):
  """The problems validate reports, asserting it raised before compiling anything."""
  with no_compilation(), pytest.raises(ConfigError) as raised:
    validate(config, workdir, **kwargs)
  assert isinstance(raised.value, ValueError)
  assert str(raised.value).count("\n  - ") == len(raised.value.problems)
  return raised.value.problems


def the_problem(config, *fragments, workdir=None, **kwargs):
  """The one problem reported, which must contain every fragment (field, value, fix)."""
  found = problems(config, workdir, **kwargs)
  assert len(found) == 1, found
  for fragment in fragments:
    assert fragment in found[0], (fragment, found[0])
  return found[0]


def save_checkpoint(directory, config, state, step=5):
  """A finished checkpoint of `state` in `directory`/checkpoints, its saved config `config`."""
  checkpointer = Checkpointer(
    str(directory / "checkpoints"),
    save_every=1,
    config=json.loads(config.to_json()),
    async_save=False,
  )
  checkpointer.maybe_save(step, state, force=True)
  checkpointer.close()
  return str(directory)


def save_base(directory, config, step=5):
  """A finished checkpoint whose saved config is `config` (the arrays are placeholders)."""
  # Scalars for every field (step, counters), small arrays for the trees.
  fields = {field.name: jnp.zeros([], jnp.int32) for field in dataclasses.fields(TrainState)}
  state = TrainState(**{**fields, "params": {"w": jnp.zeros(2)}, "opt_state": {"m": jnp.zeros(2)}})
  return save_checkpoint(directory, config, state, step)


def save_run(directory, config, step=5):
  """A checkpoint as a run of `config` leaves it: the state it trains, in zeros."""
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  abstract = configure.make_trainer(config, mesh).abstract_state()
  state = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract)
  return save_checkpoint(directory, config, state, step)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
  return save_base(tmp_path_factory.mktemp("base"), default.get_config())


def test_compilation_would_be_caught():
  """The guard every check here runs under does see a compilation."""
  with pytest.raises(AssertionError, match="validate compiled"), no_compilation():
    jax.jit(lambda x: x * 3.0)(jnp.ones(3))


# ----- every shipped config is valid ------------------------------------------------------------


# Written for one CPU device (a laptop's two cores): a batch of 4 rows, not a multiple of 8.
ONE_DEVICE_CONFIGS = (
  "smollm2_language_quick",
  "smollm2_knowledge_quick",
  "smollm2_foldoc_quick",
  "smollm2_knowledge_convergence",
)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.mode == "finetune":  # they name their base on the command line
    config.base_checkpoint = save_base(tmp_path, config)
  # ... and their instruction data (JSONL) too.
  for spec in [config.data.train, *config.data.eval_sets.values()]:
    if spec["name"].startswith("jsonl:"):
      path = tmp_path / f"{len(list(tmp_path.glob('*.jsonl')))}.jsonl"
      path.write_text(json.dumps({"prompt": "2 + 2?", "response": "4"}) + "\n")
      spec["name"] = f"jsonl:{path}"
  missing = [name for name in _local_text_names(config) if not glob.glob(name.split(":", 1)[1])]
  if missing:  # text the user installs (e.g. Debian's fortunes): only its absence is wrong
    with no_compilation(), pytest.raises(ConfigError) as error:
      validate(config)
    assert all("local_text: no files" in p for p in error.value.problems), error.value.problems
    return
  with no_compilation():
    if name in ONE_DEVICE_CONFIGS:
      validate(config, device_count=1, process_count=1)
      return
    validate(config)  # 8 CPU devices (tests/conftest.py), one process
    if name == "large_pod":
      # Written for a pod: 32 chips in 4 hosts of a TPU v5p slice, 8 rows per chip.
      validate(config, device_count=32, process_count=4)


def _local_text_names(config):
  specs = [config.data.train, *config.data.eval_sets.values(), config.replay.data]
  specs += [m.get("replay", {}).get("data", {}) for m in config.compare.methods.values()]
  specs.append(config.compare.pretrain.get("data", {}).get("train", {}))
  names = {spec.get("name") or config.data.name for spec in specs if spec is not None}
  return sorted(n for n in names if n.startswith("local_text:"))


def test_large_pod_config_fails_on_a_machine_it_does_not_fit():
  config = importlib.import_module("configs.large_pod").get_config()
  config.base_checkpoint = ""
  config.mode = "pretrain"  # the batch rule alone
  # A 512-chip slice: 256 rows cannot feed 512 chips.
  the_problem(config, "data.batch_size=256", "512 devices", "multiple of 512", device_count=512)


# ----- batch, mesh and devices ------------------------------------------------------------------


def test_batch_must_split_over_the_batch_devices():
  the_problem(
    config_with(data__batch_size=12),
    "data.batch_size=12",
    "8 devices",
    "mesh.data=8 x mesh.fsdp=1",
    "--config.data.batch_size to a multiple of 8, e.g. 8 or 16",
  )
  # With tensor parallelism the batch is split over fewer devices: 12 rows over data=4 is fine.
  validate(config_with(data__batch_size=12, mesh__tensor=2))


def test_batch_with_accumulation_must_split_per_micro_batch():
  the_problem(
    config_with(data__batch_size=16, grad_accum_steps=4),
    "data.batch_size=16",
    "grad_accum_steps=4",
    "multiple of 32",
    "--config.grad_accum_steps to one of [1, 2]",
  )


def test_batch_must_split_among_processes():
  found = problems(config_with(data__batch_size=16), device_count=12, process_count=3)
  assert any("16" in p and "3 processes" in p and "multiple of 3" in p for p in found), found


def test_batch_devices_must_split_among_processes():
  # Tensor parallelism over all 4 devices of 2 processes leaves one batch shard for two feeders.
  config = config_with(model__num_kv_heads=4, mesh__data=1, mesh__tensor=4)
  the_problem(
    config,
    "mesh=",
    "sharded over 1 devices",
    "2 processes",
    "keep mesh.tensor within one process's devices",
    device_count=4,
    process_count=2,
  )


def test_mesh_must_match_the_device_count():
  the_problem(
    config_with(mesh__data=3), "mesh=", "needs 3 devices, found 8", "--config.mesh.data=8 or -1"
  )
  the_problem(config_with(mesh__fsdp=-1), "mesh=", "at most one -1")
  the_problem(config_with(mesh__tensor=3), "mesh=", "do not divide by 3")
  # Another machine's device count is checked by the same rules.
  the_problem(
    config_with(mesh__data=8), "mesh=", "needs 8 devices, the job has 16", device_count=16
  )


def test_kv_heads_must_split_over_tensor_parallel_devices():
  # The default tiny model has 2 kv heads: tensor=4 cannot split them.
  the_problem(
    config_with(mesh__tensor=4, data__batch_size=16),
    "model.num_kv_heads=2",
    "mesh.tensor=4",
    "--config.mesh.tensor to a divisor of 2",
  )


# ----- mode, counts, optimizer, FINCH, model -----------------------------------------------------


def test_unknown_mode():
  the_problem(config_with(mode="train"), "mode='train'", "pretrain, finetune, compare")


@pytest.mark.parametrize(
  "field, value, fragment",
  [
    ("num_train_steps", 0, "positive integer"),
    ("num_train_steps", -5, "positive integer"),
    ("log_every", 0, "positive integer (1 logs every step)"),
    ("eval_every", -1, "non-negative integer (0 evaluates only at the end)"),
    ("checkpoint_every", -10, "non-negative integer (0 checkpoints only at the end)"),
    ("grad_accum_steps", 0, "positive integer"),
    ("seed", -1, "[0, 2**32)"),
    ("loss_chunk_size", -1, "non-negative integer: tokens per row whose logits the loss makes"),
  ],
)
def test_counts_and_intervals(field, value, fragment):
  the_problem(config_with(mode="pretrain", **{field: value}), f"{field}={value}", fragment)


def test_unknown_optimizer_and_schedule():
  the_problem(config_with(optimizer__name="adam"), "optimizer.name='adam'", "use 'adamw' or 'sgd'")
  the_problem(
    config_with(optimizer__schedule="linear"),
    "optimizer.schedule='linear'",
    "use 'constant' or 'cosine'",
  )
  the_problem(
    config_with(mode="pretrain", optimizer__learning_rate=-1e-3),
    "optimizer.learning_rate=-0.001",
    "positive",
  )


@pytest.mark.parametrize(
  "changes, fragments",
  [
    ({"finch__max_scale": 0.0}, ["finch.max_scale=0.0", "max_scale must be > 0"]),
    ({"finch__min_scale": 5.0}, ["finch.min_scale=5.0", "must not exceed max_scale"]),
    ({"finch__ema_decay": 1.0}, ["finch.ema_decay=1.0", "[0, 1)"]),
    (
      {"finch__reading": "target", "finch__reference_loss": -1.0, "finch__max_scale": 1.0},
      ["finch.reference_loss=-1.0", "above loss_floor", "reference_loss=None"],
    ),
    (
      {"finch__reading": "first_k", "finch__reference_steps": 0},
      ["finch.reference_steps=0", "whole number >= 1", "--config.finch.reference_steps"],
    ),
    (
      {"finch__reading": "running", "finch__reference_decay": 0.5, "finch__ema_decay": 0.9},
      ["finch.reference_decay=0.5", "must exceed ema_decay (0.9)"],
    ),
  ],
)
def test_finch_hyperparameters_out_of_range(changes, fragments):
  the_problem(config_with(mode="pretrain", finch__enabled=True, **changes), *fragments)


@pytest.mark.parametrize(
  "changes, fragments",
  [
    ({"finch__reading": "last"}, ["finch.reading='last'", "'first', 'first_k', 'running'"]),
    (
      {"finch__reading": "target"},
      ["finch.reading='target'", "set finch.reference_loss to the target"],
    ),
    (
      {"finch__reading": "target", "finch__reference_loss": 2.0},
      ["finch.max_scale=4.0", "set finch.max_scale=1"],
    ),
    ({"finch__reading": "first_k"}, ["finch.reading='first_k'", "set finch.reference_steps"]),
    ({"finch__reading": "running"}, ["finch.reading='running'", "set finch.reference_decay"]),
    (
      {"finch__reading": "running", "finch__reference_decay": 0.0},
      ["finch.reference_decay=0.0", "must be in (0, 1)"],
    ),
    (
      {"finch__reference_loss": 2.0},
      ["finch.reference_loss=2.0", "read only by reading 'target'", "finch.reading='target'"],
    ),
    (
      {"finch__reading": "running", "finch__reference_decay": 0.9, "finch__reference_steps": 4},
      ["finch.reference_steps=4", "reading 'first_k', not by 'running'"],
    ),
  ],
)
def test_finch_reading_needs_its_field_and_no_other(changes, fragments):
  the_problem(config_with(mode="pretrain", finch__enabled=True, **changes), *fragments)


@pytest.mark.parametrize(
  "changes",
  [
    {"finch__reading": "first_k", "finch__reference_steps": 8},
    {"finch__reading": "running", "finch__reference_decay": 0.99},
    {"finch__reading": "target", "finch__reference_loss": 1.5, "finch__max_scale": 1.0},
  ],
)
def test_finch_readings_validate(changes):
  validate(config_with(mode="pretrain", finch__enabled=True, **changes))


def test_finch_reading_of_a_compared_method_is_named_as_its_override():
  config = config_with()
  config.compare.methods["finch_k"] = {
    "finch": {"enabled": True, "reading": "first_k"},
    "learning_rates": (1e-4,),
  }
  the_problem(config, "compare.methods.finch_k.finch.reading='first_k'", "reference_steps")


def test_finch_options_must_exist():
  config = config_with(mode="pretrain")
  config.finch.max_scal = 2.0
  the_problem(config, "finch.max_scal=2.0", "did you mean 'max_scale'")
  # With FINCH off its options are not read, so they are not checked either.
  validate(config_with(mode="pretrain", finch__enabled=False, finch__max_scale=-1.0))


def test_invalid_model():
  the_problem(
    config_with(model__num_kv_heads=3),
    "model=",
    "num_kv_heads (3) must divide num_heads (4)",
    "use one of [1, 2, 4]",
  )
  the_problem(config_with(model__dtype="float33"), "model=", "'float32' or 'bfloat16'")


# ----- lengths ----------------------------------------------------------------------------------


def test_sequence_beyond_the_model():
  the_problem(
    config_with(data__seq_len=512),
    "data.seq_len=512",
    "max_len=256",
    "--config.data.seq_len <= 256 or raise --config.model.max_len",
  )


def test_fact_prompt_and_answer_beyond_the_model():
  the_problem(
    config_with(data__max_prompt_len=200, data__answer_len=100),
    "data.max_prompt_len=200",
    "200 + 100 = 300",
    "max_len=256",
  )
  # Without fact sets the widths are unused.
  config = config_with(mode="pretrain", data__max_prompt_len=200, data__answer_len=100)
  config.data.fact_sets = {}
  validate(config)


# ----- datasets ---------------------------------------------------------------------------------


def test_unknown_dataset_names():
  the_problem(
    config_with(data__name="embedded/biografies"),
    "data.name='embedded/biografies'",
    "unknown embedded corpus",
    "'embedded/biographies', 'embedded/synthetic_language'",
  )
  config = config_with()
  config.data.eval_sets["retain"]["name"] = "no_such_dataset_xyz"
  the_problem(
    config,
    "data.eval_sets.retain.name='no_such_dataset_xyz'",
    "not found",
    "TFDS catalog name",
  )


def test_catalog_names_are_looked_up_without_downloading(tmp_path):
  config = config_with(mode="pretrain", data__name="lm1b", data__data_dir=str(tmp_path))
  config.data.train = {"name": "", "split": "train"}
  config.data.eval_sets = {}
  config.data.fact_sets = {}
  validate(config)
  assert not any(tmp_path.iterdir())  # nothing built or downloaded
  config.data.name = "lm1b/no_such_config"
  the_problem(
    config, "data.name='lm1b/no_such_config'", "no config 'no_such_config'", "name it 'lm1b'"
  )


def test_local_text_path_must_exist(tmp_path):
  config = config_with(mode="pretrain", data__name=f"local_text:{tmp_path / 'missing'}")
  config.data.train = {"name": "", "split": "train"}
  config.data.eval_sets = {"task": {"name": "", "split": "validation"}}
  config.data.fact_sets = {}
  the_problem(config, "data.name='local_text:", "does not exist", "local_text:<directory>")
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "a.txt").write_text("One paragraph.\n\nAnother one.\n")
  config.data.name = f"local_text:{tmp_path / 'text'}"
  validate(config)


def test_splits_must_exist_and_hold_the_right_records():
  the_problem(
    config_with(data__train={"name": "", "split": "finetun"}),
    "data.train.split='finetun'",
    "no split 'finetun'",
    "'finetune'",
  )
  config = config_with()
  config.data.fact_sets["task"]["split"] = "finetune"
  the_problem(
    config,
    "data.fact_sets.task.split='finetune'",
    "prompt/answer",
    "['retain_facts', 'task_facts']",
  )
  the_problem(
    config_with(data__train={"name": "", "split": "task_facts"}),
    "data.train.split='task_facts'",
    "text sets read text",
  )


def test_misspelled_dataset_options():
  config = config_with()
  config.data.options = {"embedded_biographie": {"num_base_people": 10}}
  the_problem(
    config,
    "data.options.embedded_biographie=",
    "did you mean 'embedded_biographies'",
    "ignored",
  )
  # Options of a dataset the config does not read are not a mistake.
  config = config_with(data__name="embedded/synthetic_language")
  config.data.eval_sets["retain"]["name"] = "embedded/biographies"
  config.data.fact_sets = {}
  config.data.options = {"embedded_biographies": {"num_base_people": 10}, "lm1b": {}}
  validate(config)
  config = config_with()
  config.data.options["embedded_biographies"]["num_people"] = 3
  the_problem(config, "data.name='embedded/biographies'", "num_people", "valid options")


# ----- fine-tuning and resuming -----------------------------------------------------------------


def test_finetune_needs_a_base_checkpoint(tmp_path, tiny_base):
  config = config_with(mode="finetune")
  the_problem(config, "base_checkpoint=''", "--config.base_checkpoint", "configs/pretrain_tiny.py")
  config.base_checkpoint = str(tmp_path / "missing")
  the_problem(config, "base_checkpoint=", "does not exist", "--config.base_checkpoint")
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  config.base_checkpoint = str(tmp_path / "empty")
  the_problem(config, "base_checkpoint=", "holds no finished checkpoint")
  config.base_checkpoint = tiny_base
  validate(config)
  config.base_checkpoint = os.path.join(tiny_base, "checkpoints")  # its folder works as well
  validate(config)


def test_finetune_model_must_match_the_base(tiny_base):
  config = config_with(mode="finetune", base_checkpoint=tiny_base, model__d_model=64)
  the_problem(config, "model=", "d_model=96", "--config.model.d_model=96")


def test_workdir_holding_another_model(tmp_path, tiny_base):
  config = config_with(mode="finetune", base_checkpoint=tiny_base)
  workdir = save_run(tmp_path, config)
  validate(config, workdir)  # the same state: the run resumes from it
  config.model.num_layers = 2
  found = problems(config, workdir)
  assert any(
    p.startswith("--workdir=")
    and "params.blocks.2." in p
    and ", new none" in p
    and "model.num_layers 4 -> 2" in p
    for p in found
  ), found


def test_workdir_holding_a_state_with_finch(tmp_path):
  workdir = save_run(tmp_path, config_with(mode="pretrain", finch__enabled=True))
  the_problem(
    config_with(mode="pretrain", finch__enabled=False),
    "--workdir=",
    "of a different training state",
    "opt_state.",
    "finch.enabled True -> False",
    workdir=workdir,
  )


# Each changes the arrays of the train state: LoRA trains adapters instead of the weights,
# anchoring keeps a copy of the starting weights, and clipping (though its own state is empty)
# moves the optimizer's state one place down its chain, so no saved path matches.
@pytest.mark.parametrize(
  "field, before, after, changed",
  [
    ("lora__rank", 0, 4, "params.blocks.0.attn.k_proj.a: saved none, new float32[96, 4]"),
    ("optimizer__anchor_strength", 0.0, 0.1, "inner_state.2.anchor.blocks.0."),
    ("optimizer__grad_clip", 0.0, 1.0, "opt_state.0.0.count: saved int32[], new none"),
  ],
)
def test_resuming_a_run_whose_state_changed(tmp_path, tiny_base, field, before, after, changed):
  def config(value):
    return config_with(mode="finetune", base_checkpoint=tiny_base, **{field: value})

  workdir = save_run(tmp_path, config(before))
  the_problem(
    config(after),
    f"--workdir={workdir!r}: already holds a checkpoint (step 5)",
    changed,
    f"{field.replace('__', '.')} {before!r} -> {after!r}",
    "fail to restore it: rerun with the config that wrote it, or use a new --workdir",
    workdir=workdir,
  )


@pytest.mark.parametrize(
  "field, before, after",
  [
    ("log_every", 25, 5),
    ("optimizer__learning_rate", 1e-3, 3e-4),
    ("optimizer__grad_clip", 1.0, 0.5),  # still clipped: the same chain
    ("lora__alpha", 16.0, 32.0),  # a scale, not an array
  ],
)
def test_resuming_after_a_change_that_keeps_the_state(tmp_path, tiny_base, field, before, after):
  changes = {"mode": "finetune", "base_checkpoint": tiny_base, "lora__rank": 4}
  workdir = save_run(tmp_path, config_with(**changes, **{field: before}))
  with no_compilation():
    validate(config_with(**changes, **{field: after}), workdir)


def test_resuming_in_another_dtype_names_the_cast(tmp_path):
  workdir = save_run(tmp_path, config_with(mode="pretrain"))
  the_problem(
    config_with(mode="pretrain", model__param_dtype="bfloat16"),
    "saved float32[",
    "new bfloat16[",
    "cast it to the new dtypes",
    workdir=workdir,
  )


def test_compare_resumes_its_base_only_while_its_fingerprint_matches(tmp_path):
  """`sweep.compare` sets a base of another fingerprint aside and pretrains anew: no problem."""
  config = config_with()
  other = configure.pretrain_config(config_with(optimizer__grad_clip=0.0))
  plan.claim(str(tmp_path / "old" / "base"), configure.fingerprint(other))
  save_run(tmp_path / "old" / "base", other)
  validate(config, str(tmp_path / "old"))
  # The same fingerprint over another state (e.g. the library changed what it builds).
  plan.claim(
    str(tmp_path / "new" / "base"), configure.fingerprint(configure.pretrain_config(config))
  )
  save_run(tmp_path / "new" / "base", other)
  the_problem(
    config,
    f"--workdir='{tmp_path / 'new' / 'base'}'",
    "fail to restore",
    workdir=str(tmp_path / "new"),
  )


# ----- compare ----------------------------------------------------------------------------------


def test_compare_method_overrides_must_name_fields():
  config = config_with()
  config.compare.methods["finch"]["optimzer"] = {"learning_rate": 1.0}
  config.compare.methods["finch"]["finch"]["max_scale"] = -1.0
  found = problems(config)
  assert len(found) == 2, found
  assert "compare.methods.finch.optimzer=" in found[0] and "did you mean 'optimizer'" in found[0]
  # The rest of the method's overrides are still applied and checked.
  assert found[1].startswith("compare.methods.finch.finch.max_scale=-1.0: max_scale must be > 0")


def test_compare_learning_rates_and_baseline():
  config = config_with()
  config.compare.methods["finch"]["learning_rates"] = ()
  the_problem(config, "compare.methods.finch.learning_rates=()", "non-empty list")
  the_problem(
    config_with(compare__baseline="adamw"),
    "compare.baseline='adamw'",
    "['finch', 'standard']",
  )
  config = config_with(compare__seeds=())
  the_problem(config, "compare.seeds=()", "non-empty list of seeds")


def test_compare_pretrain_overrides_are_named():
  config = config_with()
  config.compare.pretrain["data"]["batch_size"] = 12
  the_problem(
    config,
    "compare.pretrain.data.batch_size=12",
    "--config.compare.pretrain.data.batch_size to a multiple of 8",
  )
  config = config_with()
  config.compare.pretrain["num_train_step"] = 10
  the_problem(config, "compare.pretrain.num_train_step=10", "did you mean 'num_train_steps'")


def test_compare_and_finetune_need_task_and_retain_eval_sets():
  config = config_with()
  config.data.eval_sets = {"task": {"name": "", "split": "finetune"}}
  the_problem(config, "data.eval_sets=", "'retain'")


def test_every_problem_is_reported_at_once():
  config = config_with(data__batch_size=12, data__seq_len=512, optimizer__name="adam")
  found = problems(config)
  assert {p.split("=")[0] for p in found} == {"optimizer.name", "data.batch_size", "data.seq_len"}


# ----- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
  "flag, names",
  [
    ("--config.optimzer.learning_rate=1e-3", ["optimzer", 'Did you mean "optimizer"']),
    ("--config.num_train_step=5", ["num_train_step", 'Did you mean "num_train_steps"']),
    ("--config.num_train_steps=abc", ["--config.num_train_steps=abc", "invalid literal"]),
  ],
)
def test_command_line_typos_stop_before_any_work(flag, names, tmp_path):
  """config_flags rejects unknown fields and wrong types while parsing flags, before JAX starts."""
  workdir = tmp_path / "wd"
  start = time.perf_counter()
  env = {**os.environ, "JAX_LOG_COMPILES": "1"}
  result = subprocess.run(
    [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", flag],
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
    cwd=tmp_path,
  )
  elapsed = time.perf_counter() - start
  assert result.returncode != 0
  for name in names:
    assert name in result.stderr, result.stderr[-2000:]
  assert "Compiling" not in result.stderr
  assert not workdir.exists()  # train_and_evaluate never ran
  assert elapsed < 60
