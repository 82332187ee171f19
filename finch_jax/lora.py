"""LoRA (Hu et al. 2021) as a functional transform of a model's pure parameter state.

The base weights stay as they are; a separate, small tree of adapters holds, for each targeted
projection kernel W, a pair A [*input_dims, rank] and B [rank, *output_dims]. `merge` returns the
parameter state with W + (alpha / rank) * A @ B in place of each targeted W, which
`nnx.merge(graphdef, ...)` turns into an ordinary `Llama`. Nothing in the model changes, so one
function serves Llama 3, Qwen3 and the compact model, any depth, tied or untied embeddings, and the
merged state is also the plain model to evaluate or export after training.

A kernel is viewed as a matrix [inputs, outputs], its input axes being the leading axes up to
the first output axis:

  q_proj, k_proj, v_proj   [embed | heads or kv_heads, head_dim]
  o_proj                   [heads, head_dim | embed]
  gate_proj, up_proj       [embed | mlp]
  down_proj                [mlp | embed]

A is normal(0, 1 / fan_in) with fan_in the product of the input dimensions, and B is zero, so the
adapted model equals the base model at initialisation.

A model with scanned layers (`LlamaConfig.scan_layers`) stacks each block kernel on a leading
layer axis, [layers, *inputs, *outputs]; its adapters carry that axis too, A [layers, *inputs,
rank] and B [layers, rank, *outputs], one independent pair per layer, and the merge adds each
layer's own product. Adapters are float32 whatever the base
dtype; `merge` forms the delta in float32 and casts W + delta back to W's dtype.

Sharding: A is laid out like W's input axes with the rank replicated, B like W's output axes with
the rank replicated, so A @ B comes out in W's layout without communication. Either derive the
adapters' shardings from the base model's (`lora_shardings`, or `create_sharded_lora`, which also
builds the adapters in place), or call `init_lora` on a state of `nnx.Param`s (e.g.
`nnx.state(nnx.eval_shape(...))`): it then returns `nnx.Param` adapters whose `out_sharding`
names `finch_jax.sharding.param_shardings` reads.

Training only the adapters, in a trainer that keeps `graphdef` and a pure parameter state:

  base = nnx.as_pure(nnx.state(model))                          # frozen, never donated
  adapters = create_sharded_lora(base, config, key, param_shardings)
  opt_state = tx.init(adapters)

  @jax.jit
  def train_step(adapters, opt_state, base, batch):
    def loss_fn(adapters):
      model = nnx.merge(graphdef, merge(base, adapters, config))
      return loss(model(batch["inputs"]), batch["targets"])
    loss_value, grads = jax.value_and_grad(loss_fn)(adapters)  # gradients of the adapters only
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss_value

Pass `base` as an argument of the jitted step rather than closing over it (closed-over arrays
may be embedded in the compiled program), and do not donate it. The step materialises W + delta
for every targeted kernel, and the backward pass forms each kernel's full gradient before
reducing it to A's and B's: LoRA this way saves the optimizer state and the weight updates of
full fine-tuning, not the weight-gradient compute, and holds one extra copy of the targeted
weights (plus the float32 delta of one kernel at a time, or more as XLA schedules it).

Example:
  >>> from flax import nnx
  >>> from finch_jax.models import Llama, LlamaConfig
  >>> model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  >>> graphdef, base = nnx.split(model)
  >>> base = nnx.as_pure(base)
  >>> config = LoraConfig(rank=8, alpha=16.0)
  >>> adapters = init_lora(base, config, jax.random.key(0))
  >>> o_proj = adapters["blocks"][0]["attn"]["o_proj"]
  >>> o_proj["a"].shape, o_proj["b"].shape
  ((4, 24, 8), (8, 96))
  >>> num_params(adapters) == expected_num_params(model.config, config)
  True
  >>> print(f"{trainable_fraction(adapters, base):.4f}")
  0.1135
  >>> adapted = nnx.merge(graphdef, merge(base, adapters, config))  # equals `model` at init
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# Projection name -> (kernel rank, number of leading input axes).
_KERNELS: dict[str, tuple[int, int]] = {
  "q_proj": (3, 1),
  "k_proj": (3, 1),
  "v_proj": (3, 1),
  "o_proj": (3, 2),
  "gate_proj": (2, 1),
  "up_proj": (2, 1),
  "down_proj": (2, 1),
}

ALL_TARGETS: tuple[str, ...] = tuple(_KERNELS)

_Path = tuple[Hashable, ...]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, and their rank and scaling.

  Attributes:
    rank: inner dimension r of each adapter pair A @ B; at least 1.
    alpha: the delta is scaled by alpha / rank (Hu et al. 2021), so changing the rank at a fixed
      alpha keeps the size of the initial updates roughly the same.
    targets: projection names to adapt, any of `ALL_TARGETS` (default: all seven).
  """

  rank: int
  alpha: float
  targets: tuple[str, ...] = ALL_TARGETS

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be an integer >= 1, got {self.rank!r}.")
    if (
      isinstance(self.alpha, bool)
      or not isinstance(self.alpha, numbers.Real)
      or not math.isfinite(self.alpha)
      or self.alpha <= 0
    ):
      raise ValueError(
        f"LoraConfig.alpha must be a positive number, got {self.alpha!r}: the delta is scaled "
        "by alpha / rank (alpha = 2 * rank is a common choice)."
      )
    if isinstance(self.targets, str):
      raise ValueError(
        f"LoraConfig.targets must be a sequence of projection names, got the string "
        f"{self.targets!r}: write targets=({self.targets!r},)."
      )
    targets = tuple(self.targets)
    object.__setattr__(self, "targets", targets)
    if not targets:
      raise ValueError(f"LoraConfig.targets is empty: name at least one of {list(ALL_TARGETS)}.")
    if unknown := [t for t in targets if t not in _KERNELS]:
      raise ValueError(f"Unknown LoRA targets {unknown}: valid targets are {list(ALL_TARGETS)}.")
    if len(set(targets)) != len(targets):
      raise ValueError(f"LoraConfig.targets {list(targets)} names a projection twice.")

  @property
  def scale(self) -> float:
    """alpha / rank, the factor applied to A @ B."""
    return self.alpha / self.rank


def lora_problems(spec: Mapping[str, Any] | None) -> list[tuple[str, str]]:
  """(field of a config's `lora` block, what is wrong and the fix; '' names the whole block):
  `rank` must be an integer >= 0 (0: LoRA off), and with LoRA on, `rank`, `alpha` and
  `targets` what `LoraConfig` accepts. Builds nothing."""
  spec = dict(spec or {})
  rank = spec.get("rank", 0)
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
    return [("rank", "must be an integer >= 0 (0: LoRA off).")]
  if rank:
    try:
      LoraConfig(rank=rank, alpha=spec.get("alpha"), targets=spec.get("targets"))
    except (TypeError, ValueError) as error:
      return [("", " ".join(str(error).split()))]
  return []


def _key_name(key: Any) -> Hashable:
  """The plain dict key or index of one `jax.tree_util` path entry."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return getattr(key, attr)
  raise TypeError(f"Unsupported pytree path entry {key!r}.")


def _flatten(tree: Any) -> list[tuple[_Path, Any]]:
  """(path, leaf) pairs of a nested mapping of arrays or Variables, paths as plain tuples."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in flat]


def _nest(flat: Iterable[tuple[_Path, Any]]) -> nnx.State:
  """An `nnx.State` from (path, leaf) pairs."""
  root: dict = {}
  for path, leaf in flat:
    node = root
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return nnx.State(root)


def _show(path: _Path) -> str:
  return "/".join(str(k) for k in path)


def _stacked(name: str, ndim: int) -> bool:
  """Whether a `name` kernel of rank `ndim` is stacked on a leading layer axis (scanned layers);
  False for a plain kernel, ValueError for any other rank."""
  rank, _ = _KERNELS[name]
  if ndim not in (rank, rank + 1):
    raise ValueError(
      f"LoRA expects a rank-{rank} {name} kernel there (rank {rank + 1} when stacked over "
      f"scanned layers), got rank {ndim}: pass the model's parameter state, or drop {name!r} "
      "from LoraConfig.targets."
    )
  return ndim == rank + 1


def _target_kernels(params: Any, config: LoraConfig) -> list[tuple[_Path, Any]]:
  """(path, leaf) of each kernel `config` targets, checked against the expected kernel rank."""
  found = []
  for path, leaf in _flatten(params):
    name = path[-1] if path else None
    if name not in config.targets:
      continue
    try:
      _stacked(name, len(leaf.shape))
    except ValueError as error:
      raise ValueError(f"{_show(path)} has shape {tuple(leaf.shape)}: {error}") from None
    found.append((path, leaf))
  names = {path[-1] for path, _ in found}
  if missing := [t for t in config.targets if t not in names]:
    present = sorted({p[-1] for p, _ in _flatten(params) if p and p[-1] in _KERNELS})
    raise ValueError(
      f"LoRA targets {missing} are not in the parameters (projections found: {present}): "
      "drop them from LoraConfig.targets."
    )
  return found


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_a(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """normal(0, 1 / fan_in) in float32 (fan_in: the product of the kernel's input dimensions).

  Jitted, so eager initialisation compiles one program per shape rather than one per operation.
  """
  return fan_in**-0.5 * jax.random.normal(key, shape, jnp.float32)


def init_lora(params: Any, config: LoraConfig, key: jax.Array) -> nnx.State:
  """Fresh adapters for the targeted kernels of a parameter state.

  Args:
    params: a model's parameter state, e.g. `nnx.as_pure(nnx.state(model))`. Only shapes are
      read, so `jax.ShapeDtypeStruct` leaves (`nnx.eval_shape`) do as well. When the leaves are
      `nnx.Variable`s carrying `out_sharding` names (`nnx.state(model)`), the adapters are
      `nnx.Param`s with matching names for `finch_jax.sharding.param_shardings`.
    config: ranks, scaling and targets.
    key: a `jax.random` key; each kernel's A gets its own key split from it.

  Returns:
    An `nnx.State` holding, under each targeted kernel's path, `{"a": A, "b": B}` in float32:
    A [*input_dims, rank] ~ normal(0, 1 / fan_in), B [rank, *output_dims] = 0 (each with a
    leading layer axis for a kernel stacked over scanned layers).

  Raises:
    ValueError: when a target is not in `params` or a targeted leaf is not a kernel.
  """
  kernels = _target_kernels(params, config)
  keys = jax.random.split(key, len(kernels))
  flat = []
  for (path, leaf), k in zip(kernels, keys, strict=True):
    _, n_in = _KERNELS[path[-1]]
    shape = tuple(leaf.shape)
    lead = 1 if _stacked(path[-1], len(shape)) else 0  # the layer axis, kept on A and B
    layers, in_dims, out_dims = shape[:lead], shape[lead : lead + n_in], shape[lead + n_in :]
    a = _init_a(k, (*layers, *in_dims, config.rank), math.prod(in_dims))
    b = jnp.zeros((*layers, config.rank, *out_dims), jnp.float32)
    names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
    if names is not None and len(names) == len(shape):
      names = tuple(names)
      a_names = (*names[: lead + n_in], None)
      b_names = (*names[:lead], None, *names[lead + n_in :])
      a = nnx.Param(a, out_sharding=a_names, eager_sharding=False)
      b = nnx.Param(b, out_sharding=b_names, eager_sharding=False)
    flat += [((*path, "a"), a), ((*path, "b"), b)]
  return _nest(flat)


def _adapter_pairs(lora_params: Any) -> dict[_Path, dict[str, Any]]:
  """{kernel path: {"a": A, "b": B}} from an adapter tree, checking that the pairs are whole."""
  pairs: dict[_Path, dict[str, Any]] = {}
  for path, leaf in _flatten(lora_params):
    if len(path) < 2 or path[-1] not in ("a", "b") or path[-2] not in _KERNELS:
      raise ValueError(
        f"{_show(path)} is not an adapter (expected <kernel path>/a or /b under one of "
        f"{list(ALL_TARGETS)}): pass the tree `init_lora` returned."
      )
    if isinstance(leaf, nnx.Variable):
      leaf = leaf.get_value()
    pairs.setdefault(path[:-1], {})[path[-1]] = leaf
  for path, pair in pairs.items():
    if set(pair) != {"a", "b"}:
      raise ValueError(f"The adapters of {_show(path)} lack {({'a', 'b'} - set(pair)).pop()!r}.")
  return pairs


def _delta(a: jax.Array, b: jax.Array, scale: float, stacked: bool = False) -> jax.Array:
  """scale * A @ B in float32, shaped [*A.shape[:-1], *B.shape[1:]]; with `stacked`, A and B
  share a leading layer axis and each layer's pair is multiplied on its own."""
  letters = "abcdefghijklmnopq"
  lead = "z" if stacked else ""
  n_in, n_out = a.ndim - 1 - len(lead), b.ndim - 1 - len(lead)
  ins, outs = letters[:n_in], letters[n_in : n_in + n_out]
  # An einsum over the named axes, not a reshape to a matrix: each operand keeps its layout and
  # the product comes out in the kernel's. HIGHEST: no TF32/bf16 passes for the float32 delta.
  product = jnp.einsum(
    f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}",
    a.astype(jnp.float32),
    b.astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  return scale * product


def merge(params: Any, lora_params: Any, config: LoraConfig) -> Any:
  """The parameter state with W + (alpha / rank) * A @ B in place of each adapted kernel W.

  Pure and jittable; differentiate through it with respect to `lora_params` to train the
  adapters. Leaves without adapters are returned as they are (the same arrays). Each merged
  kernel keeps W's dtype: the delta is formed in float32 and W + delta is cast back, so with
  bfloat16 weights the forward pass sees W + delta rounded to bfloat16 (the gradients still reach
  the adapters in full).

  Args:
    params: the base model's pure parameter state, e.g. `nnx.as_pure(nnx.state(model))`; a
      state of Variables (`nnx.state(model)`) gives one back, for `nnx.update(model, ...)`.
    lora_params: adapters from `init_lora` (trained or not) for this state.
    config: the `LoraConfig` the adapters were made with (its alpha / rank scales the delta).

  Returns:
    A state with the structure of `params`, for `nnx.merge(graphdef, ...)`.

  Raises:
    ValueError: when the adapters do not fit `params` or `config`.
  """
  pairs = _adapter_pairs(lora_params)
  if wrong := sorted({p[-1] for p in pairs} - set(config.targets)):
    raise ValueError(
      f"The adapters include {wrong}, which LoraConfig.targets {list(config.targets)} leaves "
      "out: pass the LoraConfig the adapters were made with."
    )
  used = set()

  def merge_leaf(keypath, leaf):
    path = tuple(_key_name(k) for k in keypath)
    pair = pairs.get(path)
    if pair is None:
      return leaf
    w = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    a, b = pair["a"], pair["b"]
    stacked = _stacked(path[-1], w.ndim)
    lead = 1 if stacked else 0
    if a.shape[-1] != config.rank or b.shape[lead : lead + 1] != (config.rank,):
      raise ValueError(
        f"The adapters of {_show(path)} have rank {a.shape[-1]}, but LoraConfig.rank is "
        f"{config.rank}: pass the LoraConfig the adapters were made with."
      )
    if (*a.shape[:-1], *b.shape[lead + 1 :]) != tuple(w.shape) or a.shape[:lead] != b.shape[:lead]:
      raise ValueError(
        f"The adapters of {_show(path)} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit its "
        f"kernel {tuple(w.shape)}: make the adapters with init_lora from this parameter state."
      )
    used.add(path)
    merged = (w.astype(jnp.float32) + _delta(a, b, config.scale, stacked)).astype(w.dtype)
    return leaf.replace(merged) if isinstance(leaf, nnx.Variable) else merged

  merged = jax.tree_util.tree_map_with_path(
    merge_leaf, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  if unused := [_show(p) for p in pairs if p not in used]:
    raise ValueError(
      f"Adapters for {unused} match no parameter: make the adapters with init_lora from this "
      "parameter state."
    )
  return merged


def lora_shardings(lora_params: Any, base_shardings: Any) -> nnx.State:
  """Shardings of the adapters, derived from their kernels' shardings.

  A [*input_dims, rank] takes the kernel's spec on its input axes and replicates the rank;
  B [rank, *output_dims] replicates the rank and takes the kernel's spec on its output axes. So
  with `finch_jax.sharding.DEFAULT_RULES` q_proj's A is P("fsdp", None) and B P(None, "tensor",
  None), o_proj's A P("tensor", None, None) and B P(None, "fsdp"). A stacked kernel's layer axis
  keeps its spec on both.

  Args:
    lora_params: adapters (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`).
    base_shardings: the base parameters' shardings in the structure of the parameter state,
      e.g. `nnx.as_pure(finch_jax.sharding.param_shardings(abstract_state, mesh))` (the
      trainer's `param_shardings`). A kernel sharding that is not a `NamedSharding` (one device)
      is used for its adapters unchanged.

  Returns:
    An `nnx.State` of shardings with the structure of `lora_params`, for `jax.device_put` or as
    `jax.jit`'s `in_shardings` / `out_shardings`.
  """
  kernel_shardings = dict(_flatten(base_shardings))
  flat = []
  for path, pair in _adapter_pairs(lora_params).items():
    sharding = kernel_shardings.get(path)
    if isinstance(sharding, nnx.Variable):
      sharding = sharding.get_value()
    if sharding is None:
      raise ValueError(
        f"No sharding for {_show(path)} in base_shardings: pass the shardings of the parameter "
        "state the adapters were made from."
      )
    a, b = pair["a"], pair["b"]
    if isinstance(sharding, NamedSharding):
      _, n_in = _KERNELS[path[-1]]
      lead = len(a.shape) - 1 - n_in  # 1 for a kernel stacked over scanned layers
      ndim = lead + n_in + len(b.shape) - 1 - lead
      spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
      a_spec = (*spec[: lead + n_in], None)
      b_spec = (*spec[:lead], None, *spec[lead + n_in :])
      a_sharding = NamedSharding(sharding.mesh, PartitionSpec(*a_spec))
      b_sharding = NamedSharding(sharding.mesh, PartitionSpec(*b_spec))
    else:
      a_sharding = b_sharding = sharding
    flat += [((*path, "a"), a_sharding), ((*path, "b"), b_sharding)]
  return _nest(flat)


def create_sharded_lora(
  params: Any, config: LoraConfig, key: jax.Array, base_shardings: Any
) -> nnx.State:
  """`init_lora` with each adapter created directly in its `lora_shardings` layout.

  Args:
    params: the base parameter state, or its shapes (`jax.ShapeDtypeStruct` leaves).
    config: ranks, scaling and targets.
    key: a `jax.random` key.
    base_shardings: the base parameters' shardings, as for `lora_shardings`.

  Returns:
    The adapters of `init_lora(params, config, key)`, placed on the mesh.
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.as_pure(params))
  build = functools.partial(init_lora, shapes, config)
  shardings = lora_shardings(jax.eval_shape(build, key), base_shardings)
  return jax.jit(build, out_shardings=shardings)(key)


def num_params(tree: Any) -> int:
  """The number of scalars in a tree of arrays, `jax.ShapeDtypeStruct`s or Variables."""
  return sum(math.prod(leaf.shape) for _, leaf in _flatten(tree))


def expected_num_params(model_config: Any, config: LoraConfig) -> int:
  """Adapter scalars for a model, from its sizes: rank * (inputs + outputs) per target and layer.

  Args:
    model_config: a `LlamaConfig` (or anything with `d_model`, `num_heads`,
      `num_kv_heads`, `resolved_head_dim`, `d_ff` and `num_layers`).
    config: ranks and targets.
  """
  c = model_config
  heads, kv = c.num_heads * c.resolved_head_dim, c.num_kv_heads * c.resolved_head_dim
  sizes = {  # (inputs, outputs) of each projection viewed as a matrix
    "q_proj": (c.d_model, heads),
    "k_proj": (c.d_model, kv),
    "v_proj": (c.d_model, kv),
    "o_proj": (heads, c.d_model),
    "gate_proj": (c.d_model, c.d_ff),
    "up_proj": (c.d_model, c.d_ff),
    "down_proj": (c.d_ff, c.d_model),
  }
  per_layer = sum(config.rank * sum(sizes[t]) for t in config.targets)
  return c.num_layers * per_layer


def trainable_fraction(lora_params: Any, params: Any) -> float:
  """Adapter scalars over all scalars of the adapted model (base plus adapters), as PEFT reports.

  Args:
    lora_params: the adapters.
    params: the base parameter state.
  """
  trained = num_params(lora_params)
  return trained / (num_params(params) + trained)


def delta_matrices(lora_params: Any, config: LoraConfig) -> dict[str, np.ndarray]:
  """Each adapted kernel's delta as a float32 numpy matrix [prod(inputs), prod(outputs)].

  For inspection (the singular values, the size of the update): keyed by the kernel's path,
  joined with "/". A kernel stacked over scanned layers gives one matrix per layer, keyed as the
  unscanned model's (`blocks/0/attn/q_proj`: the layer index after the stacked container), so
  both layouts give the same keys. Materialises every delta on the host, so keep it to small
  models or a few layers.
  """
  out = {}
  for path, pair in _adapter_pairs(lora_params).items():
    a, b = jnp.asarray(pair["a"]), jnp.asarray(pair["b"])
    _, n_in = _KERNELS[path[-1]]
    if a.ndim == n_in + 1:
      delta = np.asarray(_delta(a, b, config.scale))
      out[_show(path)] = delta.reshape(math.prod(a.shape[:-1]), math.prod(b.shape[1:]))
      continue
    deltas = np.asarray(_delta(a, b, config.scale, stacked=True))
    for i, delta in enumerate(deltas):
      key = _show((path[0], i, *path[1:]))
      out[key] = delta.reshape(math.prod(a.shape[1:-1]), math.prod(b.shape[2:]))
  return out


__all__ = [
  "ALL_TARGETS",
  "LoraConfig",
  "create_sharded_lora",
  "delta_matrices",
  "expected_num_params",
  "init_lora",
  "lora_problems",
  "lora_shardings",
  "merge",
  "num_params",
  "trainable_fraction",
]
