"""Device mesh, logical-axis rules and multi-process start.

As in MaxText, parameters name their axes logically (`vocab`, `embed`, `heads`, ... — see
`finch_jax.models.llama`) and one table of rules maps those names to the mesh axes
("data", "fsdp", "tensor"). The same model then runs data parallel (data=-1), fully sharded
(fsdp=N) or tensor parallel (tensor=N) by changing the mesh sizes, not the model; an axis of size
1 costs nothing.

Typical use:

  initialize_distributed()                        # no-op for a single process
  mesh = make_mesh(data=-1, fsdp=2)
  model = create_sharded_model(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh)
  batch = make_global_batch({"tokens": local_tokens}, mesh)

The rules of what fits are checked here without a device, for `finch_jax.validate` as for the
builders: `mesh_shape` (the mesh sizes), `indivisible_axes` (parameters that do not split over
their mesh axes) and `concurrent_runs` (the runs of a comparison that train at once).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

M = TypeVar("M", bound=nnx.Module)

MESH_AXES = ("data", "fsdp", "tensor")
# The size of each mesh axis a config leaves out: the devices left over go to "data".
MESH_DEFAULTS = {"data": -1, "fsdp": 1, "tensor": 1}

# (logical axis, mesh axes): a mesh axis name, a tuple of them, or None for replicated.
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),  # FSDP shards the batch as well as the weights.
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("norm", None),
  # The leading axis of scanned blocks' stacked parameters (LlamaConfig.scan_layers): whole on
  # every device, as in MaxText; the scan reads one layer's slice per step, so sharding it would
  # move whole layers between devices.
  ("layers", None),
)


def mesh_shape(
  sizes: Mapping[str, Any], device_count: int, *, planned: bool = False
) -> dict[str, int]:
  """The sizes of the ("data", "fsdp", "tensor") mesh that `sizes` asks for on `device_count`
  devices, the -1 resolved: the rule `make_mesh` builds by, checked without any device.

  Args:
    sizes: the mesh sizes by axis (a config's `mesh`); an axis left out takes `make_mesh`'s
      default (data -1, fsdp 1, tensor 1).
    device_count: the devices the mesh spans.
    planned: the count is a planned job's, not the devices found here (the message says so).

  Raises:
    ValueError: naming the sizes and the fix, for an unknown axis, a size that is not a positive
      integer (or the one -1), or sizes that do not fit the devices.
  """
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the axes are {MESH_AXES}.")
  sizes = {axis: sizes.get(axis, default) for axis, default in MESH_DEFAULTS.items()}
  if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes.values()):
    raise ValueError("mesh sizes must be integers (-1 for the devices left over).")
  shown = " x ".join(f"{name}={size}" for name, size in sizes.items())
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1 or any(size < 1 and size != -1 for size in sizes.values()):
    raise ValueError(f"mesh {shown}: sizes must be positive, with at most one -1 (the rest).")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    if device_count % fixed:
      raise ValueError(
        f"mesh {shown}: {device_count} devices do not divide by {fixed}: choose sizes whose "
        f"product divides {device_count}."
      )
    return {**sizes, rest[0]: device_count // fixed}
  if fixed != device_count:
    others = fixed // sizes["data"]
    fix = (
      f"set --config.mesh.data={device_count // others} or -1"
      if device_count % others == 0
      else f"choose sizes whose product is {device_count}"
    )
    found = f"the job has {device_count}" if planned else f"found {device_count}"
    raise ValueError(f"mesh {shown} needs {fixed} devices, {found}: {fix}.")
  return sizes


def make_mesh(
  data: int = MESH_DEFAULTS["data"],
  fsdp: int = MESH_DEFAULTS["fsdp"],
  tensor: int = MESH_DEFAULTS["tensor"],
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes).

  One size may be -1, meaning "the devices left over" (`mesh_shape` says which sizes fit). The
  axes are `Auto`, so `jax.jit` propagates shardings from its inputs and `out_shardings`.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
  return jax.make_mesh(
    tuple(sizes.values()),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


def logical_to_mesh(
  logical_names: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES
) -> PartitionSpec:
  """The PartitionSpec for an array whose axes have these logical names.

  None stays None (replicated). A mesh axis already used by an earlier array axis is dropped,
  since an array may be split over each mesh axis only once.
  """
  table = dict(reversed(tuple(rules)))  # the first rule for a name wins
  used: set[str] = set()
  spec = []
  for name in logical_names:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(
        f"No sharding rule for logical axis {name!r}: add ({name!r}, mesh_axes) to the rules "
        f"(known: {sorted(table)})."
      )
    axes = table[name]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(axis for axis in axes if axis not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _leaf_sharding(leaf: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedSharding for one array or Variable: from its logical names, else replicated."""
  value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
  names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
  # Optimizer states that mirror a parameter carry its names; anything whose rank does not match
  # them (factored statistics, scalars such as step counts and FINCH's state) is replicated.
  if names and len(names) == np.ndim(value):
    sharding = NamedSharding(mesh, logical_to_mesh(names, rules))
  else:
    sharding = NamedSharding(mesh, PartitionSpec())
  return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding


def param_shardings(tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """NamedShardings for every array of an NNX module or state, in the structure of its state.

  `tree` may be an NNX object (real or from `nnx.eval_shape`), e.g. the model or an
  `nnx.Optimizer`, or a state/pytree holding Variables. The result can be passed as `jax.jit`'s
  `in_shardings` or `out_shardings` for `nnx.state(tree)`.
  """
  if isinstance(tree, nnx.Pytree):  # modules and nnx.Optimizer
    tree = nnx.state(tree)
  return jax.tree.map(
    functools.partial(_leaf_sharding, mesh=mesh, rules=rules),
    tree,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def shard_state(tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """Moves an NNX object's variables to their layout in place (and returns it), or a state's."""
  if isinstance(tree, nnx.Pytree):
    nnx.update(tree, shard_state(nnx.state(tree), mesh, rules))
    return tree
  return jax.device_put(tree, param_shardings(tree, mesh, rules))


def create_sharded_model(
  model_factory: Callable[[], M], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> M:
  """Builds `model_factory()` with every parameter created directly in its sharded layout.

  The factory runs once abstractly to learn shapes and names, then under `jax.jit` with those
  shardings as `out_shardings`, so each device only ever materialises its own shards.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(model_factory))
  shardings = param_shardings(abstract_state, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.split(model_factory())[1]

  return nnx.merge(graphdef, init())


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of [batch, length] arrays: rows over the `batch` mesh axes ("data", "fsdp")."""
  return NamedSharding(mesh, logical_to_mesh(("batch", "length"), rules))


def batch_axes(rules: LogicalRules = DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes a batch's rows are split over (those of the logical axis `batch`)."""
  axes = logical_to_mesh(("batch",), rules)[0]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def indivisible_axes(
  tree: Any, shape: Mapping[str, int], rules: LogicalRules = DEFAULT_RULES
) -> list[tuple[str, int, tuple[str, ...], int]]:
  """(logical axis, its length, the mesh axes it is split over, their product) for each array
  axis of `tree` that does not divide over those mesh axes on a mesh of `shape`: `jax.jit` would
  refuse the layout `param_shardings` gives it. `tree` is an NNX object, real or from
  `nnx.eval_shape`, so a model is checked before anything is allocated."""
  found = []
  for _, variable in nnx.iter_graph(tree):
    if not isinstance(variable, nnx.Variable):
      continue
    names = variable.get_metadata().get("out_sharding")
    dims = getattr(variable.get_value(), "shape", ())
    if not names or len(names) != len(dims):
      continue
    for logical, dim, axes in zip(names, dims, logical_to_mesh(names, rules), strict=True):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      divisor = math.prod(shape[a] for a in axes)
      if divisor > 1 and dim % divisor:
        found.append((logical, dim, axes, divisor))
  return found


def cpu_cores() -> int | None:
  """The CPU cores this process may run on when it is the only process of a CPU job; None on
  accelerators or with several processes (see `concurrent_runs`)."""
  if jax.process_count() > 1 or jax.default_backend() != "cpu":
    return None
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def concurrent_runs(
  wanted: int,
  mesh: Mapping[str, int],
  device_count: int,
  *,
  process_count: int = 1,
  cpu_cores: int | None = None,
) -> int:
  """How many runs of a comparison train at once, each on an equal group of consecutive devices.

  `wanted` (`compare.concurrent_runs`) 0 means: one run per core on a single-process CPU machine
  (`cpu_cores`, None elsewhere), where XLA:CPU trains two small models on one core each about
  1.6 times as fast as one on both cores (with more devices than cores, as in tests that fake 8,
  each run gets an equal group of them), and one at a time on accelerators, where a run has all
  the devices. A run's mesh (`mesh`, a config's sizes) needs `fsdp * tensor` devices (times
  `data` when that is fixed).

  Raises:
    ValueError: naming the fix, when the devices do not split into `wanted` such groups, or
      when several processes would train several runs.
  """
  mesh = {**MESH_DEFAULTS, **mesh}
  needed = mesh["fsdp"] * mesh["tensor"] * (mesh["data"] if mesh["data"] > 0 else 1)
  if not wanted:
    wanted = 1
    for runs in range(min(device_count // needed, cpu_cores or 1), 1, -1):
      if device_count % runs == 0:  # the most runs, at most one per core, in equal groups
        wanted = runs
        break
  if wanted < 1 or device_count % wanted or device_count // wanted < needed:
    raise ValueError(
      f"{device_count} devices do not split into {wanted} equal groups of at least {needed} "
      f"(the mesh of one run); use a divisor of {device_count // needed}, or 0."
    )
  if process_count > 1 and wanted > 1:
    raise ValueError(
      "more than one run at once needs a single process: with several, every run spans them "
      "all. Set it to 1 (or 0)."
    )
  return wanted


def make_global_batch(
  local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> dict[str, jax.Array]:
  """Global arrays from this process's rows; each process passes only its own share of the batch.

  Every array is split over the `batch` mesh axes along its first axis; other axes are whole.
  """
  batch_axes = batch_sharding(mesh, rules).spec[0]

  def to_global(array: np.ndarray) -> jax.Array:
    spec = PartitionSpec(batch_axes, *([None] * (np.ndim(array) - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), array)

  return {name: to_global(array) for name, array in local_batch.items()}


def _cluster_announced() -> bool:
  """Whether `jax.distributed.initialize()` would find its settings in the environment."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  # Ask JAX's own auto-detection (Open MPI, SLURM, Cloud TPU VMs and GKE, Kubernetes), so this
  # agrees with what initialize() will do; mpi4py is opt-in there and left out here too.
  from jax._src import clusters

  return any(
    env.is_env_present() for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method
  )


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Starts JAX's multi-process runtime when this run is one of several processes.

  With all three arguments, initializes with them (e.g. several processes on 127.0.0.1). With
  none, initializes from the cluster's environment when it announces one (Cloud TPU pod, SLURM,
  Open MPI, Kubernetes, or `JAX_COORDINATOR_ADDRESS`) and otherwise does nothing. Must run before
  anything touches a device. CPU processes exchange data through gloo.

  Returns:
    True when the distributed runtime is (now) initialized, False for a plain single process.
  """
  flags = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  given = [name for name, value in flags.items() if value is not None]
  if given and len(given) < len(flags):
    missing = [f"--{name}" for name in flags if name not in given]
    raise ValueError(
      f"initialize_distributed got {', '.join('--' + name for name in given)} but not "
      f"{', '.join(missing)}: pass all three, or none to use the cluster's environment."
    )
  if jax.distributed.is_initialized():
    return True
  if not given and not _cluster_announced():
    return False
  # CPU collectives across processes need an implementation; gloo ships with jaxlib. Only the CPU
  # client reads this flag, so GPU and TPU runs are unaffected.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name`; nothing with one process.

  For what one process does on behalf of all (renaming a directory aside, say) before the others
  may look there: process 0 acts, then all call `barrier` with the same name.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
