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
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from finch_jax import sharding as shd
from finch_jax.models import Transformer, TransformerConfig
from finch_jax.transform import finch, find_finch_states

Batch = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
  """What a training run carries from step to step (and into checkpoints)."""

  step: jax.Array  # [] int32: optimizer steps taken.
  params: Any  # nnx.State of the model's parameters (plain arrays).
  opt_state: Any  # optax state of `Trainer.tx`.


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
      `final_lr_fraction`, `weight_decay`, `b1`, `b2`, `eps` (adamw), `momentum` (sgd) and
      `grad_clip` (global norm; 0 disables).
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
  if name == "adamw":
    core = optax.inject_hyperparams(optax.adamw)(
      learning_rate=o["learning_rate"],
      b1=o.get("b1", 0.9),
      b2=o.get("b2", 0.95),
      eps=o.get("eps", 1e-8),
      weight_decay=o.get("weight_decay", 0.0),
    )
  elif name == "sgd":
    core = optax.inject_hyperparams(optax.sgd)(
      learning_rate=o["learning_rate"], momentum=o.get("momentum", 0.9) or None
    )
  else:
    raise ValueError(f"Unknown optimizer {name!r}: use 'adamw' or 'sgd'.")
  parts = [optax.clip_by_global_norm(o["grad_clip"])] if o.get("grad_clip", 0) else []
  base = optax.chain(*parts, core, optax.scale_by_schedule(shape))
  if finch_options and finch_options.get("enabled", False):
    kwargs = {k: v for k, v in finch_options.items() if k != "enabled"}
    return finch(base, **kwargs), shape
  return optax.with_extra_args_support(base), shape


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """(sum of weighted token cross-entropies, sum of weights), both float32 scalars."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


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
  """Jitted training and evaluation of a `Transformer` on a mesh.

  Args:
    model_config: the model's architecture.
    tx: the optimizer, e.g. from `make_optimizer`; it receives the loss as `value`.
    schedule: the schedule shape (peak 1) to report the effective learning rate.
    mesh: the device mesh (`finch_jax.sharding.make_mesh`).
    grad_accum_steps: micro-batches per optimizer step.
    rules: logical-axis rules mapping parameter axes to mesh axes.
  """

  def __init__(
    self,
    model_config: TransformerConfig,
    tx: optax.GradientTransformationExtraArgs,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    grad_accum_steps: int = 1,
    rules: shd.LogicalRules = shd.DEFAULT_RULES,
  ):
    self.model_config = model_config
    self.tx = tx
    self.schedule = schedule
    self.mesh = mesh
    self.rules = rules
    self.grad_accum_steps = grad_accum_steps
    abstract = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_state = nnx.split(abstract)
    self.param_shardings = nnx.as_pure(shd.param_shardings(abstract_state, mesh, rules))
    self.batch_sharding = shd.batch_sharding(mesh, rules)
    self.has_finch = bool(find_finch_states(jax.eval_shape(tx.init, nnx.as_pure(abstract_state))))
    self._train_step = jax.jit(self._train_step_impl, donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval_step_impl)
    self._fact_step = jax.jit(self._fact_step_impl)

  # ----- state -------------------------------------------------------------------------------

  def init_params(self, seed: int) -> Any:
    """Fresh parameters, created directly in their sharded layout."""
    model = shd.create_sharded_model(
      lambda: Transformer(self.model_config, rngs=nnx.Rngs(seed)), self.mesh, self.rules
    )
    return nnx.as_pure(nnx.state(model))

  def create_state(self, params: Any, learning_rate: float | None = None) -> TrainState:
    """A step-0 state around `params`; `learning_rate` overrides the optimizer's peak rate."""
    # A copy: the train step donates its state, and the caller may reuse `params` (a base
    # model shared by a whole sweep).
    params = jax.tree.map(jnp.copy, jax.device_put(params, self.param_shardings))
    opt_state = jax.jit(self.tx.init, out_shardings=self._opt_shardings())(params)
    if learning_rate is not None:
      opt_state = optax.tree.set(opt_state, learning_rate=jnp.asarray(learning_rate, jnp.float32))
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=opt_state)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of a state, for restoring a checkpoint without allocating."""
    shapes = jax.eval_shape(self.create_state, self._abstract_params())
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    shardings = TrainState(
      step=replicated, params=self.param_shardings, opt_state=self._opt_shardings()
    )
    return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      shapes,
      shardings,
    )

  def _abstract_params(self) -> Any:
    return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      nnx.as_pure(nnx.split(nnx.eval_shape(self._new_model))[1]),
      self.param_shardings,
    )

  def _new_model(self) -> Transformer:
    return Transformer(self.model_config, rngs=nnx.Rngs(0))

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
    return model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])

  def _train_step_impl(self, state: TrainState, batch: Batch):
    total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

    def loss_fn(params, micro):
      loss_sum, _ = token_cross_entropy(
        self._logits(params, micro), micro["targets"], micro["weights"]
      )
      return loss_sum / total_weight

    grad_fn = jax.value_and_grad(loss_fn)
    if self.grad_accum_steps == 1:
      loss, grads = grad_fn(state.params, batch)
    else:

      def accumulate(carry, micro):
        loss, grads = grad_fn(state.params, micro)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      micro_batches = _split_micro_batches(batch, self.grad_accum_steps)
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro_batches)

    updates, opt_state = self.tx.update(grads, state.opt_state, state.params, value=loss)
    params = optax.apply_updates(state.params, updates)
    lr = optax.tree.get(state.opt_state, "learning_rate") * self.schedule(state.step)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": lr}
    if self.has_finch:
      (finch_state,) = find_finch_states(opt_state)
      metrics["finch_scale"] = finch_state.scale
      metrics["forgetting_bound"] = finch_state.scale * jnp.sqrt(
        jnp.maximum(finch_state.smoothed_loss, 0.0)
      )
      metrics["num_skipped"] = finch_state.num_skipped
      metrics["effective_learning_rate"] = lr * jnp.where(jnp.isfinite(loss), finch_state.scale, 0)
    else:
      metrics["effective_learning_rate"] = lr
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _eval_step_impl(self, params: Any, batch: Batch):
    return token_cross_entropy(self._logits(params, batch), batch["targets"], batch["weights"])

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows as one global batch sharded over the mesh."""
    return shd.make_global_batch(local_batch, self.mesh, self.rules)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (the input state is donated). Metrics stay on device."""
    return self._train_step(state, batch)

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


# ----- the fit loop ----------------------------------------------------------------------------


class MetricsWriter:
  """One JSON object per logged step in `metrics.jsonl`, and TensorBoard event files."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
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
) -> FitResult:
  """Trains `state` until `num_train_steps`, logging, evaluating and checkpointing on the way.

  Metrics stay on device between logging steps; each logged record holds the means over the
  steps since the last one, plus tokens/s, step time and the share of time spent waiting for
  input. `evaluate(params, step)` runs every `eval_every` steps and at the end; its values are
  logged with the step. `checkpointer.maybe_save(step, state)` is called after every step and
  `checkpointer.save(step, state, force=True)` at the end.
  """
  start_step = int(state.step)
  bar = ProgressBar(num_train_steps, enabled=progress and jax.process_index() == 0)
  pending: list[dict[str, jax.Array]] = []
  evals: list[dict[str, float]] = []
  input_time, window_start = 0.0, time.perf_counter()
  for step in range(start_step, num_train_steps):
    t = time.perf_counter()
    batch = trainer.global_batch(next(batches))
    input_time += time.perf_counter() - t
    state, metrics = trainer.train_step(state, batch)
    pending.append(metrics)
    done = step + 1
    if done % log_every == 0 or done == num_train_steps:
      values = jax.device_get(pending)
      elapsed = time.perf_counter() - window_start
      record = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
      if "num_skipped" in record:
        record["num_skipped"] = int(values[-1]["num_skipped"])
      record["step_time"] = elapsed / len(values)
      record["input_wait_share"] = input_time / max(elapsed, 1e-9)
      if tokens_per_batch:
        record["tokens_per_second"] = tokens_per_batch * len(values) / max(elapsed, 1e-9)
      if writer:
        writer.write(done, record)
      bar.update(done, f"loss {record['loss']:.4f}")
      pending, input_time, window_start = [], 0.0, time.perf_counter()
    if evaluate and ((eval_every and done % eval_every == 0) or done == num_train_steps):
      result = {"step": done, **evaluate(state.params, done)}
      evals.append(result)
      if writer:
        writer.write(done, {k: v for k, v in result.items() if k != "step"})
      window_start = time.perf_counter()  # evaluation time is not training time
    if checkpointer is not None:
      checkpointer.maybe_save(done, state, force=done == num_train_steps)
  bar.close()
  return FitResult(state=state, evals=evals)


__all__ = [
  "FitResult",
  "MetricsWriter",
  "ProgressBar",
  "TrainState",
  "Trainer",
  "fit",
  "make_optimizer",
  "schedule_shape",
  "token_cross_entropy",
]
