"""Flax NNX training on a device mesh: the train state, the jitted steps, the `Trainer`.

The steps are functions of explicit arguments (`train_step(spec, state, batch, reference)`,
`eval_step`, `fact_step`), as in Flax's examples; `Trainer` holds what they close over (the
model's graph definition, the optimizer, the shardings) and jits them once. The model lives as a
graph definition plus a pure parameter state, so one jitted step serves a whole learning-rate
sweep: the peak learning rate sits in the optimizer state (`optax.inject_hyperparams`), not in
the compiled code.

Gradient accumulation is done here rather than with `optax.MultiSteps`: the step splits its batch
into micro-batches, sums their token-weighted losses and gradients, and hands the optimizer the
mean loss of the whole accumulated batch as `value`, which is what FINCH must see
(`MultiSteps` would pass the last micro-batch's loss).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from finch_jax import lora as lora_lib
from finch_jax import losses, measures, models
from finch_jax import sharding as shd
from finch_jax.measures import token_cross_entropy
from finch_jax.remedies import token_kl_to_base
from finch_jax.transform import finch_stats, find_finch_states, zero_unless

Batch = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
  """What a training run carries from step to step (and into checkpoints)."""

  step: jax.Array  # [] int32: optimizer steps taken (batches consumed, skipped ones included).
  params: Any  # nnx.State of the model's parameters (plain arrays).
  opt_state: Any  # optax state of `Trainer.tx`.
  num_skipped: jax.Array  # [] int32: steps whose loss or gradients were not finite (no update).


def _micro_batch_shape(batch: Batch, num: int) -> Batch:
  """Shapes of one of `num` micro-batches of `batch`: the real row count, since a kernel
  mapped over the mesh (splash under shard_map) needs rows that split over the batch axes."""
  return {
    k: jax.ShapeDtypeStruct((v.shape[0] // num, *v.shape[1:]), v.dtype) for k, v in batch.items()
  }


def _split_micro_batches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B // num, ...] taking rows k, k + num, ... for micro-batch k.

  Strided rather than contiguous so that each device's rows stay on that device.
  """

  def split(x):
    if x.shape[0] % num:
      raise ValueError(
        f"batch of {x.shape[0]} rows does not split into {num} micro-batches: make "
        "batch_size a multiple of grad_accum_steps."
      )
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)

  return {k: split(v) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What a step needs besides its arrays: fixed for a trainer, closed over when jitting."""

  graphdef: Any  # nnx.GraphDef of the model.
  tx: optax.GradientTransformationExtraArgs  # the optimizer; it receives the loss as `value`.
  schedule: optax.Schedule  # schedule shape (peak 1), for the logged learning rate.
  logits_sharding: jax.sharding.NamedSharding  # layout of [batch, length, vocab] logits.
  grad_accum_steps: int = 1  # micro-batches per optimizer step.
  kl_weight: float = 0.0  # weight of KL(reference || model) on replay tokens.
  lora: lora_lib.LoraConfig | None = None  # the state trains adapters of the reference.
  has_finch: bool = False  # whether `tx` holds a `scale_by_finch` (its telemetry is logged).
  loss_floor: float = 0.0  # FINCH's `loss_floor`, for the logged forgetting bound.
  loss_chunk_size: int = 0  # tokens per row whose logits the loss makes at once (0: all).


def _on_mesh(spec: StepSpec):
  """The trainer's mesh as the abstract mesh in context while the model runs: attention's
  "auto" resolves for the mesh's platform (splash when compiling for TPU devices, even on a
  CPU host), and splash runs per shard under `shard_map` over it."""
  return jax.sharding.use_abstract_mesh(spec.logits_sharding.mesh.abstract_mesh)


def full_params(spec: StepSpec, params: Any, reference: Any) -> Any:
  """The model's parameters for a train state's `params` (LoRA's adapters merged in)."""
  return params if spec.lora is None else lora_lib.merge(reference, params, spec.lora)


def logits(spec: StepSpec, params: Any, batch: Batch) -> jax.Array:
  """The model's float32 logits for `batch`'s inputs, laid out like the batch."""
  model = nnx.merge(spec.graphdef, params)
  with _on_mesh(spec):
    out = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
  # Laid out like the batch (and the vocabulary over `tensor`): otherwise, with the embedding
  # sharded over fsdp, the compiler may gather the whole batch's logits on every device,
  # [batch, length, vocab] floats each (74 GiB per chip for Qwen3-4B at 32 x 4096 tokens).
  return jax.lax.with_sharding_constraint(out, spec.logits_sharding)


def hidden_and_head(spec: StepSpec, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """The model's final hidden states for `batch`'s inputs and its output projection
  (`Llama.hidden_and_head`), which `finch_jax.losses` turns into logits a chunk at a time."""
  model = nnx.merge(spec.graphdef, params)
  with _on_mesh(spec):
    return model.hidden_and_head(
      batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"]
    )


def loss_sums(spec: StepSpec, params: Any, micro: Batch, reference: Any) -> tuple[jax.Array, Any]:
  """(sum of the token losses of `micro`, auxiliary sums for the metrics)."""
  if spec.loss_chunk_size:
    return _chunked_loss_sums(spec, params, micro, reference)
  model_logits = logits(spec, full_params(spec, params, reference), micro)
  weights = micro["weights"]
  if not spec.kl_weight:
    loss_sum, _ = token_cross_entropy(model_logits, micro["targets"], weights)
    return loss_sum, {}
  replay = micro["replay"].astype(jnp.float32) * weights
  ce_sum, _ = token_cross_entropy(model_logits, micro["targets"], weights - replay)
  kl_sum, kl_tokens = token_kl_to_base(model_logits, logits(spec, reference, micro), replay)
  return ce_sum + spec.kl_weight * kl_sum, {"kl_sum": kl_sum, "kl_tokens": kl_tokens}


def _chunked_loss_sums(
  spec: StepSpec, params: Any, micro: Batch, reference: Any
) -> tuple[jax.Array, Any]:
  """`loss_sums` with the logits made `spec.loss_chunk_size` tokens of each row at a time
  (`finch_jax.losses`): the same token losses, to float32 rounding, without ever holding the
  whole [batch, length, vocab] logits or their gradient."""
  hidden, head = hidden_and_head(spec, full_params(spec, params, reference), micro)
  options = dict(chunk_size=spec.loss_chunk_size, logits_sharding=spec.logits_sharding)
  weights = micro["weights"]
  if not spec.kl_weight:
    loss_sum, _ = losses.cross_entropy_sums(hidden, head, micro["targets"], weights, **options)
    return loss_sum, {}
  replay = micro["replay"].astype(jnp.float32) * weights
  base_hidden, base_head = hidden_and_head(spec, reference, micro)
  ce_sum, _, kl_sum, kl_tokens = losses.cross_entropy_and_kl_sums(
    hidden, head, micro["targets"], weights - replay, base_hidden, base_head, replay, **options
  )
  return ce_sum + spec.kl_weight * kl_sum, {"kl_sum": kl_sum, "kl_tokens": kl_tokens}


def _loss_and_grads(spec: StepSpec, params: Any, batch: Batch, reference: Any):
  """((mean loss over the batch's tokens, aux sums), gradients), accumulated over micro-batches."""
  total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

  def loss_fn(params, micro):
    loss_sum, aux = loss_sums(spec, params, micro, reference)
    return loss_sum / total_weight, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if spec.grad_accum_steps == 1:
    return grad_fn(params, batch)

  def accumulate(carry, micro):
    return jax.tree.map(jnp.add, carry, grad_fn(params, micro)), None

  micro = _micro_batch_shape(batch, spec.grad_accum_steps)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, micro))
  out, _ = jax.lax.scan(accumulate, zeros, _split_micro_batches(batch, spec.grad_accum_steps))
  return out


def train_step(
  spec: StepSpec, state: TrainState, batch: Batch, reference: Any
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `batch`; a step whose loss or gradients are not finite changes no
  parameter and is counted in `num_skipped`."""
  (loss, aux), grads = _loss_and_grads(spec, state.params, batch, reference)
  grad_norm = optax.tree.norm(grads)
  # The norm is NaN or inf as soon as one gradient is (or their squares overflow, which no
  # update would survive either): one scalar test covers the loss and every gradient.
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # FINCH reads a NaN loss as "skip this step" and leaves its statistics alone; zeroing the
  # gradients as FINCH does makes a skipped step the same whether FINCH is on or not.
  updates, opt_state = spec.tx.update(
    zero_unless(grads, ok), state.opt_state, state.params, value=jnp.where(ok, loss, jnp.nan)
  )
  # Fed zero gradients, the optimizer proposes a finite update (momentum, weight decay), so a
  # factor of 0 drops it. A scalar product fuses into the parameter update; a second cond, over
  # the updates, made a step without FINCH 2.5-4.3% slower on an H100 (25M and 160M
  # parameters), against 1.2-1.8% with the product (with FINCH: within 1%, either way).
  keep = ok.astype(jnp.float32)
  params = optax.apply_updates(
    state.params, jax.tree.map(lambda u: u * keep.astype(u.dtype), updates)
  )
  num_skipped = state.num_skipped + jnp.where(ok, 0, 1).astype(jnp.int32)
  lr = optax.tree.get(state.opt_state, "learning_rate") * spec.schedule(state.step)
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "num_skipped": num_skipped}
  if aux:
    metrics["kl"] = aux["kl_sum"] / jnp.maximum(aux["kl_tokens"], 1.0)
  scale = jnp.ones([])
  if spec.has_finch:
    stats = finch_stats(opt_state, spec.loss_floor)
    scale = stats["scale"]
    metrics["finch_scale"] = scale
    metrics["forgetting_bound"] = stats["forgetting_bound"]
  metrics["effective_learning_rate"] = lr * jnp.where(ok, scale, 0)
  new_state = TrainState(
    step=state.step + 1, params=params, opt_state=opt_state, num_skipped=num_skipped
  )
  return new_state, metrics


def eval_step(
  spec: StepSpec, params: Any, batch: Batch, reference: Any, end_ids: jax.Array
) -> dict[str, jax.Array]:
  """The sums of `finch_jax.measures.token_sums` for a text or instruction batch: loss, token
  accuracy without end markers (`end_ids`), exact answers and, with `reference` parameters,
  KL(reference || model).

  With `loss_chunk_size` only `loss` and `tokens`: the logits are made a chunk at a time and
  never held whole, as on a pod, where the other measures are not taken."""
  if spec.loss_chunk_size:
    hidden, head = hidden_and_head(spec, params, batch)
    loss, tokens = losses.cross_entropy_sums(
      hidden,
      head,
      batch["targets"],
      batch["weights"],
      chunk_size=spec.loss_chunk_size,
      logits_sharding=spec.logits_sharding,
    )
    return {"loss": loss, "tokens": tokens}
  reference_logits = None if reference is None else logits(spec, reference, batch)
  return measures.token_sums(logits(spec, params, batch), batch, end_ids, reference_logits)


def fact_step(
  spec: StepSpec, params: Any, batch: Batch, continues: jax.Array
) -> dict[str, jax.Array]:
  """The sums of `finch_jax.measures.fact_sums` for a batch of fact probes: exact recall that
  ends where it should, the answers' NLL, calibration bins of the first answer token."""
  tokens, _ = measures.fact_inputs(batch)
  with _on_mesh(spec):
    model_logits = nnx.merge(spec.graphdef, params)(tokens)
  return measures.fact_sums(model_logits, batch, continues)


def _check_options(kl_weight: float, loss_chunk_size: int) -> None:
  if kl_weight < 0:
    raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
  integral = isinstance(loss_chunk_size, numbers.Integral)
  if isinstance(loss_chunk_size, bool) or not integral or loss_chunk_size < 0:
    raise ValueError(
      f"loss_chunk_size must be an integer >= 0, got {loss_chunk_size!r}: tokens per chunk, "
      "or 0 for the whole logits at once."
    )


class Trainer:
  """Jitted training and evaluation of a language model (`finch_jax.models`) on a mesh.

  A step whose loss or gradients are not finite (a poisoned batch, an overflow) changes no
  parameter, with or without FINCH: the optimizer is fed zero gradients in place of the NaN ones
  (so no NaN reaches its state; Adam's moments decay once, as in `finch_jax.finch`), its update is
  dropped, and `TrainState.num_skipped` (logged as `num_skipped`) counts the step.

  The reference model: with `kl_weight > 0` the loss on replay tokens (`batch["replay"] == 1`) is
  `kl_weight` times the KL divergence from the reference model's next-token distribution to the
  trained model's (`finch_jax.remedies.token_kl_to_base`), in place of their cross-entropy; the
  other tokens keep theirs. The reference parameters (the base model, `set_reference`) are held
  by the trainer, outside the train state: they are not trained, donated or checkpointed.

  LoRA (`lora`): the train state holds only the adapters (`finch_jax.lora`), so the optimizer,
  its state and the checkpoints cover them alone; the base weights are the reference, frozen,
  and each step runs the model with `lora.merge(base, adapters)`. `full_params` turns a state's
  parameters into the model's (merging the adapters), which evaluation takes.

  Args:
    model_config: the model's architecture (a `LlamaConfig`).
    tx: the optimizer, e.g. from `finch_jax.optim.make_optimizer`; it receives the loss as
      `value`.
    schedule: the schedule shape (peak 1) to report the effective learning rate.
    mesh: the device mesh (`finch_jax.sharding.make_mesh`).
    grad_accum_steps: micro-batches per optimizer step.
    rules: logical-axis rules mapping parameter axes to mesh axes.
    kl_weight: weight of the KL-to-reference term on replay tokens (0: plain cross-entropy).
    lora: train low-rank adapters of the base instead of all of its weights (None: all).
    loss_floor: FINCH's `loss_floor`, for the logged forgetting bound.
    loss_chunk_size: tokens of each row whose logits the loss (and evaluation) makes at a time,
      from the model's final hidden states (`finch_jax.losses`); 0 makes the whole logits at
      once. Need not divide the sequence length.
  """

  def __init__(
    self,
    model_config: models.ModelConfig,
    tx: optax.GradientTransformationExtraArgs,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    grad_accum_steps: int = 1,
    rules: shd.LogicalRules = shd.DEFAULT_RULES,
    kl_weight: float = 0.0,
    lora: lora_lib.LoraConfig | None = None,
    loss_floor: float = 0.0,
    loss_chunk_size: int = 0,
  ):
    _check_options(kl_weight, loss_chunk_size)
    self.model_config = model_config
    self.tx = tx
    self.schedule = schedule
    self.mesh = mesh
    self.rules = rules
    self.grad_accum_steps = grad_accum_steps
    self.kl_weight = float(kl_weight)
    self.lora = lora
    self.reference: Any = None
    abstract = nnx.eval_shape(self._new_model)
    self.graphdef, abstract_state = nnx.split(abstract)
    self.param_shardings = nnx.as_pure(shd.param_shardings(abstract_state, mesh, rules))
    # What the train state holds and the optimizer updates: the weights, or LoRA's adapters.
    self.trained_shardings = self.param_shardings
    if lora is not None:
      adapters = jax.eval_shape(
        lambda: lora_lib.init_lora(nnx.as_pure(abstract_state), lora, jax.random.key(0))
      )
      self.trained_shardings = lora_lib.lora_shardings(adapters, self.param_shardings)
    self.batch_sharding = shd.batch_sharding(mesh, rules)
    logits_sharding = jax.sharding.NamedSharding(
      mesh, shd.logical_to_mesh(("batch", "length", "vocab"), rules)
    )
    has_finch = bool(find_finch_states(jax.eval_shape(tx.init, self._abstract_params())))
    self.spec = StepSpec(
      graphdef=self.graphdef,
      tx=tx,
      schedule=schedule,
      logits_sharding=logits_sharding,
      grad_accum_steps=grad_accum_steps,
      kl_weight=self.kl_weight,
      lora=lora,
      has_finch=has_finch,
      loss_floor=float(loss_floor),
      loss_chunk_size=int(loss_chunk_size),
    )
    self._jit_steps()

  def _jit_steps(self) -> None:
    """The steps, jitted once with the spec closed over."""
    # The new state keeps the old one's layout, so it is written over the donated buffers and
    # the next step reuses the compiled program (left free, the compiler may hand back, e.g.,
    # replicated norm scales sharded over fsdp).
    self._train_step = jax.jit(
      functools.partial(train_step, self.spec),
      donate_argnums=(0,),
      out_shardings=(self._state_shardings(), None),
    )
    self._eval_step = jax.jit(functools.partial(eval_step, self.spec))
    self._fact_step = jax.jit(functools.partial(fact_step, self.spec))
    self._merge = jax.jit(functools.partial(full_params, self.spec))

  @property
  def needs_reference(self) -> bool:
    """Whether steps read the reference (base) model, which `set_reference` must provide."""
    return self.kl_weight > 0 or self.lora is not None

  def held_bytes(self, state: TrainState) -> int:
    """Bytes a run holds in device memory besides activations: the trained parameters (weights
    or adapters), the optimizer state, and the reference model when one is held."""
    trees = [state.params, state.opt_state] + ([self.reference] if self.needs_reference else [])
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trees)))

  def full_params(self, params: Any) -> Any:
    """The model's parameters for a train state's `params` (adapters merged in with LoRA)."""
    return params if self.lora is None else self._merge(params, self.reference)

  @property
  def has_finch(self) -> bool:
    """Whether the optimizer holds FINCH."""
    return self.spec.has_finch

  def set_reference(self, params: Any) -> None:
    """The reference model's parameters (the base), laid out like the model's."""
    self.reference = jax.device_put(params, self.param_shardings)

  # ----- state -------------------------------------------------------------------------------

  def init_params(self, seed: int) -> Any:
    """Fresh parameters, created directly in their sharded layout."""
    model = shd.create_sharded_model(
      lambda: models.build(self.model_config, nnx.Rngs(seed)), self.mesh, self.rules
    )
    return nnx.as_pure(nnx.state(model))

  def create_state(
    self, params: Any, learning_rate: float | None = None, seed: int = 0
  ) -> TrainState:
    """A step-0 state from the model's `params`.

    `learning_rate` overrides the optimizer's peak rate. With LoRA (or a KL term) `params` also
    become the reference (`set_reference`), and the state holds fresh adapters drawn with
    `seed`.
    """
    if self.needs_reference:
      self.set_reference(params)
    if self.lora is not None:
      trained = lora_lib.create_sharded_lora(
        self.reference, self.lora, jax.random.key(seed), self.param_shardings
      )
    else:
      # A copy: the train step donates its state, and the caller may reuse `params` (a base
      # model shared by a whole sweep).
      trained = jax.tree.map(jnp.copy, jax.device_put(params, self.param_shardings))
    state = self._make_state(trained)
    if learning_rate is not None:
      opt_state = optax.tree.set(
        state.opt_state, learning_rate=jnp.asarray(learning_rate, jnp.float32)
      )
      state = state.replace(opt_state=opt_state)
    return state

  def _make_state(self, trained: Any) -> TrainState:
    opt_state = jax.jit(self.tx.init, out_shardings=self._opt_shardings())(trained)
    # The counters laid out as the step returns them (replicated over the mesh): an array left
    # on one device would make the second step compile the program again.
    # Two arrays: the step donates its state, and one buffer cannot be donated twice.
    step, num_skipped = jax.device_put(
      (jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)), self._state_shardings().step
    )
    return TrainState(step=step, params=trained, opt_state=opt_state, num_skipped=num_skipped)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of a state, for restoring a checkpoint without allocating."""
    shapes = jax.eval_shape(self._make_state, self._abstract_params())
    return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes,
      self._state_shardings(),
    )

  def _state_shardings(self) -> TrainState:
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return TrainState(
      step=replicated,
      params=self.trained_shardings,
      opt_state=self._opt_shardings(),
      num_skipped=replicated,
    )

  def abstract_model_params(self) -> Any:
    """Shapes, dtypes and shardings of the model's parameters (e.g. to restore a base)."""
    return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      nnx.as_pure(nnx.split(nnx.eval_shape(self._new_model))[1]),
      self.param_shardings,
    )

  def _abstract_params(self) -> Any:
    """Shapes and shardings of what the state trains (the weights, or LoRA's adapters)."""
    shapes = nnx.as_pure(nnx.split(nnx.eval_shape(self._new_model))[1])
    if self.lora is not None:
      shapes = jax.eval_shape(lambda: lora_lib.init_lora(shapes, self.lora, jax.random.key(0)))
    return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes,
      self.trained_shardings,
    )

  def _new_model(self) -> nnx.Module:
    return models.build(self.model_config, nnx.Rngs(0))

  def _opt_shardings(self) -> Any:
    """Optimizer-state shardings: a leaf whose path ends with a parameter's path and has its
    shape (Adam's moments, momentum) is laid out like that parameter; the rest is replicated."""
    flat = jax.tree_util.tree_flatten_with_path(self._abstract_params())[0]
    by_path = {tuple(path): (leaf.shape, leaf.sharding) for path, leaf in flat}
    lengths = sorted({len(path) for path in by_path}, reverse=True)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
      for n in lengths:
        match = by_path.get(tuple(path[-n:])) if len(path) >= n else None
        if match and match[0] == leaf.shape:
          return match[1]
      return replicated

    opt_shapes = jax.eval_shape(self.tx.init, self._abstract_params())
    return jax.tree_util.tree_map_with_path(pick, opt_shapes)

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows as one global batch sharded over the mesh."""
    return shd.make_global_batch(local_batch, self.mesh, self.rules)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (the input state is donated). Metrics stay on device."""
    if self.needs_reference and self.reference is None:
      raise ValueError(
        "This trainer's loss reads the base model: call set_reference(params) first."
      )
    return self._train_step(state, batch, self.reference)

  def _summed(
    self, step, params: Any, batches: Iterable[Mapping[str, np.ndarray]], *extra
  ) -> dict[str, Any]:
    """The sums `step(params, batch, *extra)` returns, added on device over every batch of a
    finite iterable (the one host loop of every measure), fetched once."""
    total = None
    for local in batches:
      sums = step(params, self.global_batch(local), *extra)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return {} if total is None else jax.device_get(total)

  def eval_sums(
    self,
    params: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    reference: Any = None,
    end_ids: Sequence[int] = (),
  ) -> dict[str, float]:
    """`eval_step`'s sums over every batch (`finch_jax.measures.token_sums`)."""
    ends = jnp.asarray(list(end_ids) or [-1], jnp.int32)
    sums = self._summed(self._eval_step, params, batches, reference, ends)
    return {key: float(value) for key, value in sums.items()}

  def fact_sums(
    self, params: Any, batches: Iterable[Mapping[str, np.ndarray]], continues: np.ndarray
  ) -> dict[str, Any]:
    """`fact_step`'s sums over every batch of fact probes (`finch_jax.measures.fact_sums`);
    `continues` from `finch_jax.data.tokenizer.word_continuations`."""
    return self._summed(self._fact_step, params, batches, jnp.asarray(continues))

  def evaluate(self, params: Any, batches: Iterable[Mapping[str, np.ndarray]]) -> float:
    """Token-weighted mean loss over every batch of a finite iterable."""
    sums = self.eval_sums(params, batches)
    return sums.get("loss", 0.0) / max(sums.get("tokens", 0.0), 1.0)


__all__ = [
  "StepSpec",
  "TrainState",
  "Trainer",
  "eval_step",
  "fact_step",
  "full_params",
  "logits",
  "loss_sums",
  "token_cross_entropy",
  "train_step",
]
