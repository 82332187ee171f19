"""Flax NNX training on a device mesh: optimizer, jitted train and eval steps, the fit loop.

The model lives as a graph definition plus a pure parameter state, so one jitted step serves a
whole learning-rate sweep: the peak learning rate sits in the optimizer state
(`optax.inject_hyperparams`), not in the compiled code.

Gradient accumulation is done here rather than with `optax.MultiSteps`: the step splits its batch
into micro-batches, sums their token-weighted losses and gradients, and hands the optimizer the
mean loss of the whole accumulated batch as `value`, which is what FINCH must see
(`MultiSteps` would pass the last micro-batch's loss).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from finch_jax import lora as lora_lib
from finch_jax import models
from finch_jax import sharding as shd
from finch_jax.remedies import anchor_to_init, token_kl_to_base
from finch_jax.transform import finch, find_finch_states

Batch = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
  """What a training run carries from step to step (and into checkpoints)."""

  step: jax.Array  # [] int32: optimizer steps taken (batches consumed, skipped ones included).
  params: Any  # nnx.State of the model's parameters (plain arrays).
  opt_state: Any  # optax state of `Trainer.tx`.
  num_skipped: jax.Array  # [] int32: steps whose loss or gradients were not finite (no update).


def schedule_shape(
  kind: str, num_train_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0
) -> optax.Schedule:
  """A learning-rate schedule with peak 1: linear warm-up, then `constant` or `cosine` decay."""
  if kind not in ("constant", "cosine"):
    raise ValueError(f"Unknown schedule {kind!r}: use 'constant' or 'cosine'.")
  if kind == "constant":
    after = optax.constant_schedule(1.0)
  else:
    decay_steps = max(num_train_steps - warmup_steps, 1)
    after = optax.cosine_decay_schedule(1.0, decay_steps, alpha=final_fraction)
  if warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, 1.0, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
  optimizer: Mapping[str, Any], finch_options: Mapping[str, Any] | None, num_train_steps: int
) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
  """The optimizer a config asks for, and its schedule shape (peak 1).

  Args:
    optimizer: `name` ('adamw' or 'sgd'), `learning_rate` (peak), `schedule`, `warmup_steps`,
      `final_lr_fraction`, `weight_decay`, `b1`, `b2`, `eps` (adamw), `momentum` (sgd),
      `grad_clip` (global norm; 0 disables) and `anchor_strength`: when > 0, each step also
      moves the weights `learning_rate * anchor_strength` of the way back to where fine-tuning
      started (`finch_jax.remedies.anchor_to_init`, decoupled like AdamW's weight decay; its
      state holds a copy of the starting weights).
    finch_options: None or a mapping with `enabled` and the keyword arguments of
      `finch_jax.finch`; when enabled, FINCH scales the base optimizer's updates.
    num_train_steps: length of the run, for decaying schedules.

  Returns:
    (optimizer, schedule shape). The effective learning rate at step t is
    `learning_rate * shape(t)`, times FINCH's scale when it is on.
  """
  o = dict(optimizer)
  shape = schedule_shape(
    o.get("schedule", "constant"),
    num_train_steps,
    o.get("warmup_steps", 0),
    o.get("final_lr_fraction", 0.0),
  )
  name = o.get("name", "adamw")
  anchor = o.get("anchor_strength", 0.0)
  if name == "adamw":
    core = optax.inject_hyperparams(_anchored_adamw if anchor else optax.adamw)(
      learning_rate=o["learning_rate"],
      b1=o.get("b1", 0.9),
      b2=o.get("b2", 0.95),
      eps=o.get("eps", 1e-8),
      weight_decay=o.get("weight_decay", 0.0),
      **({"anchor_strength": anchor} if anchor else {}),
    )
  elif name == "sgd":
    core = optax.inject_hyperparams(_anchored_sgd if anchor else optax.sgd)(
      learning_rate=o["learning_rate"],
      momentum=o.get("momentum", 0.9) or None,
      **({"anchor_strength": anchor} if anchor else {}),
    )
  else:
    raise ValueError(f"Unknown optimizer {name!r}: use 'adamw' or 'sgd'.")
  parts = [optax.clip_by_global_norm(o["grad_clip"])] if o.get("grad_clip", 0) else []
  base = optax.chain(*parts, core, optax.scale_by_schedule(shape))
  if finch_options and finch_options.get("enabled", False):
    kwargs = {k: v for k, v in finch_options.items() if k != "enabled"}
    return finch(base, **kwargs), shape
  return optax.with_extra_args_support(base), shape


def _anchored_adamw(
  learning_rate, b1, b2, eps, weight_decay, anchor_strength
) -> optax.GradientTransformation:
  """AdamW with a decoupled pull toward the starting weights beside its weight decay."""
  return optax.chain(
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.add_decayed_weights(weight_decay),
    anchor_to_init(anchor_strength),
    optax.scale_by_learning_rate(learning_rate),
  )


def _anchored_sgd(learning_rate, momentum, anchor_strength) -> optax.GradientTransformation:
  """SGD (with momentum) plus a decoupled pull toward the starting weights."""
  parts = [optax.trace(decay=momentum)] if momentum else []
  return optax.chain(
    *parts, anchor_to_init(anchor_strength), optax.scale_by_learning_rate(learning_rate)
  )


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """(sum of weighted token cross-entropies, sum of weights), both float32 scalars."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


def _first_micro_batch(batch: Batch) -> Batch:
  return {k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype) for k, v in batch.items()}


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
    model_config: the model's architecture (`TransformerConfig` or `LlamaConfig`).
    tx: the optimizer, e.g. from `make_optimizer`; it receives the loss as `value`.
    schedule: the schedule shape (peak 1) to report the effective learning rate.
    mesh: the device mesh (`finch_jax.sharding.make_mesh`).
    grad_accum_steps: micro-batches per optimizer step.
    rules: logical-axis rules mapping parameter axes to mesh axes.
    kl_weight: weight of the KL-to-reference term on replay tokens (0: plain cross-entropy).
    lora: train low-rank adapters of the base instead of all of its weights (None: all).
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
  ):
    if kl_weight < 0:
      raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
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
    self._logits_sharding = jax.sharding.NamedSharding(
      mesh, shd.logical_to_mesh(("batch", "length", "vocab"), rules)
    )
    self.has_finch = bool(find_finch_states(jax.eval_shape(tx.init, self._abstract_params())))
    # The new state keeps the old one's layout, so it is written over the donated buffers and
    # the next step reuses the compiled program (left free, the compiler may hand back, e.g.,
    # replicated norm scales sharded over fsdp).
    self._train_step = jax.jit(
      self._train_step_impl, donate_argnums=(0,), out_shardings=(self._state_shardings(), None)
    )
    self._eval_step = jax.jit(self._eval_step_impl)
    self._fact_step = jax.jit(self._fact_step_impl)
    self._merge = jax.jit(self._full_params_impl)

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
    if self.lora is None:
      return params
    return self._merge(params, self.reference)

  def _full_params_impl(self, params: Any, reference: Any) -> Any:
    if self.lora is None:
      return params
    return lora_lib.merge(reference, params, self.lora)

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
    return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=trained,
      opt_state=opt_state,
      num_skipped=jnp.zeros([], jnp.int32),
    )

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

  # ----- steps -------------------------------------------------------------------------------

  def _logits(self, params: Any, batch: Batch) -> jax.Array:
    model = nnx.merge(self.graphdef, params)
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    # Laid out like the batch (and the vocabulary over `tensor`): otherwise, with the embedding
    # sharded over fsdp, the compiler may gather the whole batch's logits on every device,
    # [batch, length, vocab] floats each (74 GiB per chip for Qwen3-4B at 32 x 4096 tokens).
    return jax.lax.with_sharding_constraint(logits, self._logits_sharding)

  def _loss_sums(self, params: Any, micro: Batch, reference: Any) -> tuple[jax.Array, Any]:
    """(sum of the token losses of `micro`, auxiliary sums for the metrics)."""
    logits = self._logits(self._full_params_impl(params, reference), micro)
    weights = micro["weights"]
    if not self.kl_weight:
      loss_sum, _ = token_cross_entropy(logits, micro["targets"], weights)
      return loss_sum, {}
    replay = micro["replay"].astype(jnp.float32) * weights
    ce_sum, _ = token_cross_entropy(logits, micro["targets"], weights - replay)
    base_logits = self._logits(reference, micro)
    kl_sum, kl_weight = token_kl_to_base(logits, base_logits, replay)
    return ce_sum + self.kl_weight * kl_sum, {"kl_sum": kl_sum, "kl_tokens": kl_weight}

  def _train_step_impl(self, state: TrainState, batch: Batch, reference: Any):
    total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

    def loss_fn(params, micro):
      loss_sum, aux = self._loss_sums(params, micro, reference)
      return loss_sum / total_weight, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if self.grad_accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch)
    else:

      def accumulate(carry, micro):
        out = grad_fn(state.params, micro)
        return jax.tree.map(jnp.add, carry, out), None

      zeros = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(grad_fn, state.params, _first_micro_batch(batch))
      )
      micro_batches = _split_micro_batches(batch, self.grad_accum_steps)
      ((loss, aux), grads), _ = jax.lax.scan(accumulate, zeros, micro_batches)

    grad_norm = optax.tree.norm(grads)
    # The norm is NaN or inf as soon as one gradient is (or their squares overflow, which no
    # update would survive either): one scalar test covers the loss and every gradient.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # FINCH reads a NaN loss as "skip this step" and leaves its statistics alone; the zeroing
    # here does the same for any optimizer, so a skipped step never depends on FINCH being on.
    updates, opt_state = self.tx.update(
      _zero_unless(grads, ok), state.opt_state, state.params, value=jnp.where(ok, loss, jnp.nan)
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
    lr = optax.tree.get(state.opt_state, "learning_rate") * self.schedule(state.step)
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      **({"kl": aux["kl_sum"] / jnp.maximum(aux["kl_tokens"], 1.0)} if aux else {}),
      "learning_rate": lr,
      "num_skipped": num_skipped,
    }
    if self.has_finch:
      (finch_state,) = find_finch_states(opt_state)
      metrics["finch_scale"] = finch_state.scale
      metrics["forgetting_bound"] = finch_state.scale * jnp.sqrt(
        jnp.maximum(finch_state.smoothed_loss, 0.0)
      )
      metrics["effective_learning_rate"] = lr * jnp.where(ok, finch_state.scale, 0)
    else:
      metrics["effective_learning_rate"] = jnp.where(ok, lr, 0)
    new_state = TrainState(
      step=state.step + 1, params=params, opt_state=opt_state, num_skipped=num_skipped
    )
    return new_state, metrics

  def _eval_step_impl(self, params: Any, batch: Batch):
    return token_cross_entropy(self._logits(params, batch), batch["targets"], batch["weights"])

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

  def evaluate(self, params: Any, batches: Iterable[Mapping[str, np.ndarray]]) -> float:
    """Token-weighted mean loss over every batch of a finite iterable."""
    loss_sum, weight_sum = jnp.zeros([]), jnp.zeros([])
    for batch in batches:
      s, w = self._eval_step(params, self.global_batch(batch))
      loss_sum, weight_sum = loss_sum + s, weight_sum + w
    return float(loss_sum / jnp.maximum(weight_sum, 1.0))

  def fact_accuracy(self, params: Any, batches: Iterable[Mapping[str, np.ndarray]]) -> float:
    """Share of facts whose answer greedy decoding would produce exactly.

    Greedy decoding reproduces the answer exactly if and only if, with the correct answer so far
    as context, the arg-max next token is the correct one at every answer position; so one
    teacher-forced forward pass per batch gives the same verdict as decoding token by token.
    Batches come from `finch_jax.data.fact_batches`; counting happens on device, so each process
    may hold only its own rows.
    """
    correct, total = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)
    for local in batches:
      c, t = self._fact_step(params, self.global_batch(local))
      correct, total = correct + c, total + t
    return float(correct) / max(int(total), 1)

  def _fact_step_impl(self, params: Any, batch: Batch):
    prompts, lengths, answers = batch["prompts"], batch["prompt_lengths"], batch["answers"]
    batch_size, answer_len = answers.shape
    rows = jnp.arange(batch_size)[:, None]
    answer_pos = lengths[:, None] + jnp.arange(answer_len)  # where each answer token goes
    tokens = jnp.pad(prompts, ((0, 0), (0, answer_len))).at[rows, answer_pos].set(answers)
    logits = nnx.merge(self.graphdef, params)(tokens)
    predicted = jnp.argmax(logits[rows, answer_pos - 1], axis=-1)
    recalled = jnp.all((predicted == answers) | (batch["answer_mask"] == 0), axis=1)
    counted = batch["example_mask"] > 0
    return jnp.sum(recalled & counted), jnp.sum(counted)


def _zero_unless(tree: Any, keep: jax.Array) -> Any:
  """`tree` where `keep`, zeros where not, in the form that is cheapest on each platform.

  As measured for `finch_jax.finch`: on CPU a select fuses into the computation around it, while
  on GPU it costs an extra pass over the arrays that a cond with a pass-through branch avoids.
  """
  return jax.lax.platform_dependent(tree, keep, cpu=_zero_by_select, default=_zero_by_cond)


def _zero_by_select(tree: Any, keep: jax.Array) -> Any:
  return jax.tree.map(lambda x: jnp.where(keep, x, jnp.zeros_like(x)), tree)


def _zero_by_cond(tree: Any, keep: jax.Array) -> Any:
  return jax.lax.cond(keep, lambda t: t, lambda t: jax.tree.map(jnp.zeros_like, t), tree)


# ----- the fit loop ----------------------------------------------------------------------------


class MetricsWriter:
  """One JSON object per logged step in `metrics.jsonl`, and TensorBoard event files.

  Args:
    workdir: where `metrics.jsonl` and `tensorboard/` go; records are appended.
    enabled: False on the processes that do not write (all but process 0).
    truncate_after: the step a run starts from (0, or the checkpoint it resumed from). Records
      past it were written by an attempt that did not reach its next checkpoint and are redone
      now, so they are dropped: `metrics.jsonl` holds one record per logged step, as an
      uninterrupted run's does. TensorBoard files are left as they are (TensorBoard shows the
      newest value of a step).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, truncate_after: int | None = None):
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if truncate_after is not None:
        _drop_records_after(path, truncate_after)
      self._file = open(path, "a")  # noqa: SIM115
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard files are a convenience; the JSONL is the record.
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Appends one record for `step`."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, int | float):
          self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    """Flushes and closes the files."""
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites the JSONL file at `path` without its records past `step` (and torn lines)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short when the process died mid-write
      continue
    if line.endswith("\n") and record.get("step", 0) <= step:
      kept.append(line)
  if len(kept) == len(lines):
    return
  logging.info("Dropped %d records past step %d from %s.", len(lines) - len(kept), step, path)
  # Written aside and renamed, so that a crash here cannot lose the records that are kept.
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


def _jsonable(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class ProgressBar:
  """A one-line console progress report, rewritten in place on a terminal."""

  def __init__(self, total: int, *, enabled: bool = True, stream=sys.stderr):
    self.total, self.enabled, self.stream = total, enabled, stream
    self._tty = stream.isatty()

  def update(self, step: int, text: str) -> None:
    """Shows `step` of `total` and a short text."""
    if not self.enabled:
      return
    width = 24
    done = int(width * step / max(self.total, 1))
    line = f"[{'#' * done}{'.' * (width - done)}] {step}/{self.total} {text}"
    self.stream.write(("\r" + line) if self._tty else (line + "\n"))
    self.stream.flush()

  def close(self) -> None:
    """Ends the line."""
    if self.enabled and self._tty:
      self.stream.write("\n")


@dataclasses.dataclass
class FitResult:
  """What `fit` hands back."""

  state: TrainState
  evals: list[dict[str, float]]  # one record per evaluation: step and each named value


class Preempted(SystemExit):
  """Raised by `fit` after SIGTERM or SIGINT, once the checkpoint of the step reached is saved.

  A `SystemExit` whose `code` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the
  code a shell reports for a process that signal ended: `python train.py` exits with it and no
  traceback, a scheduler that retries failed jobs sees an unfinished run rather than a success,
  and `except Exception` does not swallow it. Rerunning the same command resumes from `step`.

  Attributes:
    signum: the signal received.
    step: the step whose checkpoint was saved.
    state: the training state at that step (for callers of `fit` without a checkpointer).
  """

  def __init__(self, signum: int, step: int, state: TrainState, message: str):
    super().__init__(128 + signum)
    self.signum, self.step, self.state, self.message = signum, step, state, message

  def __str__(self) -> str:
    return self.message


class _StopRequests:
  """Turns SIGTERM and SIGINT into a request to stop at the next step boundary.

  The handler only sets a flag; the loop reads it once per step (a Python attribute, no device
  sync). A second SIGINT raises KeyboardInterrupt at once, for a user who will not wait for the
  checkpoint. With several processes they must all stop at the same step, or the save (and every
  collective after it) would hang: there SIGTERM is left to JAX's preemption service, which agrees
  on a step across processes without a collective per step, and SIGINT is handed to it as a
  SIGTERM. Signals ignored when the run started (`nohup`, background jobs) stay ignored.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    self._sync = self._multi and bool(jax.config.jax_enable_preemption_service)

  def __enter__(self) -> _StopRequests:
    if threading.current_thread() is not threading.main_thread():
      return self  # Python only lets the main thread set handlers; signals then act as usual.
    if self._multi and not self._sync:
      logging.warning(
        "JAX's preemption service is off (jax_enable_preemption_service): SIGTERM and SIGINT "
        "end this multi-process run without a checkpoint of the step reached."
      )
      return self
    for signum in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
      previous = signal.getsignal(signum)
      if previous is not signal.SIG_IGN:
        self._previous[signum] = previous
        signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      return  # A repeated SIGTERM: the checkpoint is already on its way.
    self.signum = signum
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption notifier, see the docstring.

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (the same answer on every process)."""
    if self._sync:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None

  def preempted(self, step: int, state: TrainState, checkpointer: Any) -> Preempted:
    """The exception to raise once the checkpoint of `step` is saved."""
    signum = self.signum or signal.SIGTERM  # Other processes hear of it from JAX's service.
    where = getattr(checkpointer, "directory", None)
    saved = (
      f"the checkpoint of step {step} is in {where}; rerun the same command to resume"
      if where
      else "nothing was saved (fit was given no checkpointer)"
    )
    message = f"Stopped by {signal.Signals(signum).name} after step {step}: {saved}."
    return Preempted(signum, step, state, message)


def _window_to_json(window: list[Mapping[str, Any]]) -> dict[str, Any]:
  """Per-step metrics not yet logged, as JSON that `_window_from_json` reads back bit for bit."""
  if not window:
    return {"dtypes": {}, "steps": []}
  dtypes = {k: str(np.asarray(v).dtype) for k, v in window[0].items()}
  return {"dtypes": dtypes, "steps": [{k: _jsonable(v) for k, v in m.items()} for m in window]}


def _window_from_json(data: Mapping[str, Any] | None) -> list[dict[str, np.ndarray]]:
  if not data:
    return []
  dtypes = data["dtypes"]
  return [{k: np.asarray(v, dtypes[k]) for k, v in m.items()} for m in data["steps"]]


def fit(
  trainer: Trainer,
  state: TrainState,
  batches: Iterator[Mapping[str, np.ndarray]],
  *,
  num_train_steps: int,
  log_every: int = 50,
  eval_every: int = 0,
  evaluate: Callable[[Any], dict[str, float]] | None = None,
  writer: MetricsWriter | None = None,
  checkpointer: Any = None,
  progress: bool = True,
  tokens_per_batch: int | None = None,
  resume: Mapping[str, Any] | None = None,
) -> FitResult:
  """Trains `state` until `num_train_steps`, logging, evaluating and checkpointing on the way.

  Metrics stay on device between logging steps; each logged record holds the means over the
  steps since the last one, plus tokens/s, step time and the share of time spent waiting for
  input. `evaluate(params, step)` runs every `eval_every` steps and at the end; its values are
  logged with the step. `checkpointer.maybe_save(step, state, force=..., extra=...)` is called
  after every step (forced at the end); `extra` is a function, called only when a checkpoint is
  written, that returns the metrics of the unfinished logging window and the evaluations so far
  (JSON), which a resumed run passes back as `resume`.

  Preemption: while `fit` runs, SIGTERM and SIGINT only set a flag. At the next step boundary
  `fit` saves the checkpoint of that step (data iterator included) and raises `Preempted`, a
  `SystemExit` with code 128 + the signal number: 143 for SIGTERM, 130 for SIGINT. So `python
  train.py` stops with that exit code and a one-line message, no traceback; a scheduler sees an
  unfinished run; and rerunning the same command resumes from the saved step, ending with the
  parameters and logged losses of an uninterrupted run, bit for bit. A second SIGINT interrupts at
  once. With several processes JAX's preemption service picks one step for all of them.

  Args:
    trainer: the `Trainer` whose step runs.
    state: where to start; its `step` is the first step's index.
    batches: this process's batches (numpy), e.g. a Grain iterator.
    num_train_steps: the step to stop at.
    log_every: steps per metrics record.
    eval_every: steps between evaluations (0: only at the end).
    evaluate: `evaluate(params, step) -> {name: value}` with the model's parameters
      (`trainer.full_params(state.params)`), or None.
    writer: where records go, or None.
    checkpointer: a `finch_jax.checkpoint.Checkpointer`, or None.
    progress: show a progress bar on process 0.
    tokens_per_batch: tokens in a global batch, for tokens/s.
    resume: `extra` of the checkpoint `state` was restored from (`Checkpointer.restored_extra`).

  Raises:
    Preempted: after SIGTERM or SIGINT, once the checkpoint is saved.
  """
  start_step = int(state.step)
  resume = resume or {}
  bar = ProgressBar(num_train_steps, enabled=progress and jax.process_index() == 0)
  # The unfinished window comes back from the checkpoint, so a resumed run logs the same means.
  pending: list[Mapping[str, Any]] = _window_from_json(resume.get("metrics_window"))
  evals: list[dict[str, float]] = [dict(e) for e in resume.get("evals", [])]
  timed_steps = 0  # steps of the window run by this process, for the timings
  input_time, window_start = 0.0, time.perf_counter()

  def extra() -> dict[str, Any]:
    return {
      "metrics_window": _window_to_json(jax.device_get(pending)),
      "evals": [{k: _jsonable(v) for k, v in e.items()} for e in evals],
    }

  with _StopRequests() as stop:
    for step in range(start_step, num_train_steps):
      t = time.perf_counter()
      batch = trainer.global_batch(next(batches))
      input_time += time.perf_counter() - t
      state, metrics = trainer.train_step(state, batch)
      pending.append(metrics)
      timed_steps += 1
      done = step + 1
      if done % log_every == 0 or done == num_train_steps:
        values = jax.device_get(pending)
        elapsed = time.perf_counter() - window_start
        record = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        record["num_skipped"] = int(values[-1]["num_skipped"])
        record["step_time"] = elapsed / timed_steps
        record["input_wait_share"] = input_time / max(elapsed, 1e-9)
        if tokens_per_batch:
          record["tokens_per_second"] = tokens_per_batch * timed_steps / max(elapsed, 1e-9)
        if writer:
          writer.write(done, record)
        bar.update(done, f"loss {record['loss']:.4f}")
        pending, timed_steps, input_time = [], 0, 0.0
        window_start = time.perf_counter()
      if evaluate and ((eval_every and done % eval_every == 0) or done == num_train_steps):
        result = {"step": done, **evaluate(trainer.full_params(state.params), done)}
        evals.append(result)
        if writer:
          writer.write(done, {k: v for k, v in result.items() if k != "step"})
        window_start = time.perf_counter()  # evaluation time is not training time
      stopping = stop.reached(done)
      if checkpointer is not None:
        checkpointer.maybe_save(done, state, force=stopping or done == num_train_steps, extra=extra)
      if stopping:
        bar.close()
        error = stop.preempted(done, state, checkpointer)
        logging.warning("%s", error)
        raise error
  bar.close()
  return FitResult(state=state, evals=evals)


__all__ = [
  "FitResult",
  "MetricsWriter",
  "Preempted",
  "ProgressBar",
  "TrainState",
  "Trainer",
  "fit",
  "make_optimizer",
  "schedule_shape",
  "token_cross_entropy",
]
