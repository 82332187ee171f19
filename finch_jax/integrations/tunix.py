"""FINCH in Tunix's `PeftTrainer`: a subclass whose optimizer receives each step's loss.

Written against google-tunix 0.1.7 (`TUNIX_VERSION`). Tunix's train step
(`tunix.sft.peft_trainer.PeftTrainer._train_step`) calls ``optimizer.update(model, grads)``
without the loss, so FINCH cannot see it; `FinchPeftTrainer` overrides that one method to
pass ``value=``, and otherwise is Tunix's trainer (data loop, LoRA, checkpoints, metrics):

    trainer = FinchPeftTrainer(model, finch_jax.finch(optax.adamw(1e-4)), training_config)
    trainer.with_loss_fn(loss_fn).train(train_ds)

What FINCH sees:

- The loss is the mean loss Tunix optimizes: the loss function's value on the step's batch.
- With ``gradient_accumulation_steps = k`` Tunix wraps the optimizer in `optax.MultiSteps`,
  calls the train step once per micro-batch and applies the mean of the k micro-batches'
  gradients on the k-th. `MultiSteps` hands the wrapped optimizer only the current call's
  ``value``, and keeps its state only on the k-th call, so FINCH would see the last
  micro-batch's loss. The override hands it, on each call, the running mean of the losses of
  the micro-batches accumulated so far (kept beside the optimizer state, reset when a new
  optimizer step starts): on the k-th call, the mean loss over the accumulated batch, the same
  mean Tunix logs as the step's loss. FINCH's state commits once per optimizer step.
- LoRA: Tunix trains the model's `nnx.LoRAParam`s (from `qwix.apply_lora_to_model`) alone;
  the override differentiates with respect to them exactly as Tunix does.
- FINCH's statistics (`finch_jax.finch_stats`) reach Tunix's `MetricsLogger` each optimizer
  step as ``finch_scale``, ``finch_reference_loss``, ``finch_smoothed_loss``,
  ``finch_forgetting_bound`` and ``finch_num_skipped`` (the values after the step).

`tests/integration/test_tunix.py` checks the installed Tunix still has the surface this relies
on (the method's signature and body, the attributes it reads) and fails loudly when it changes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tunix.sft import peft_trainer

from finch_jax.transform import finch_stats, find_finch_states

TUNIX_VERSION = "0.1.7"  # the google-tunix release this override was written against

# Names under which FINCH's statistics reach Tunix's metrics logger.
FINCH_METRICS = (
  "finch_scale",
  "finch_reference_loss",
  "finch_smoothed_loss",
  "finch_forgetting_bound",
  "finch_num_skipped",
)


class MicroBatchLoss(nnx.Variable):
  """The running mean of the micro-batch losses of the optimizer step under way (float32 []).

  Not an `nnx.optimizer.OptState`, so Tunix's checkpoints leave it out: they are written between
  optimizer steps, where it is not read (the next step's first micro-batch starts it afresh)."""


def _last(values: list[Any]) -> Any:
  """A metric's value after the optimizer step: its value at the step's last micro-batch."""
  return values[-1]


class FinchPeftTrainer(peft_trainer.PeftTrainer):
  """Tunix's `PeftTrainer` whose optimizer receives the step's loss as ``value``.

  Use it in place of `PeftTrainer` with an optimizer that holds FINCH; everything else
  (configuration, ``with_loss_fn``, ``with_gen_model_input_fn``, ``train``) is Tunix's. A plain
  optax optimizer ignores ``value``, so the trainer also runs one without FINCH (nothing is then
  added to the metrics).

  Example:
    >>> import jax.numpy as jnp, optax, finch_jax
    >>> from flax import nnx
    >>> from tunix.sft import peft_trainer
    >>> from finch_jax.integrations.tunix import FinchPeftTrainer
    >>> model = nnx.Linear(4, 1, rngs=nnx.Rngs(0))
    >>> config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=3)
    >>> trainer = FinchPeftTrainer(model, finch_jax.finch(optax.adamw(1e-2)), config)
    >>> trainer = trainer.with_loss_fn(lambda m, x, y: jnp.mean((m(x) - y) ** 2))
    >>> trainer.train([{"x": jnp.ones((8, 4)), "y": jnp.ones((8, 1))}] * 3)
    >>> len(trainer.metrics_logger.get_metric_history("", "finch_scale", "train"))
    3

  Args:
    model: as for `PeftTrainer`.
    optimizer: the optax optimizer, e.g. ``finch_jax.finch(optax.adamw(1e-4))``.
    training_config: as for `PeftTrainer` (``gradient_accumulation_steps`` included).
    loss_floor: the ``loss_floor`` FINCH was built with, for the logged forgetting bound.
    **kwargs: `PeftTrainer`'s other arguments (``metrics_logger``, ...).
  """

  def __init__(
    self,
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    training_config: peft_trainer.TrainingConfig,
    *,
    loss_floor: float = 0.0,
    **kwargs: Any,
  ):
    super().__init__(model, optimizer, training_config, **kwargs)
    self.loss_floor = float(loss_floor)
    self.has_finch = bool(find_finch_states(self.optimizer.opt_state))
    self.optimizer.finch_micro_batch_loss = MicroBatchLoss(jnp.zeros([], jnp.float32))

  def _train_step(
    self, model: nnx.Module, optimizer: nnx.Optimizer, inputs: Any
  ) -> tuple[jax.Array, Any, jax.Array]:
    """Tunix 0.1.7's train step with ``value=`` passed to ``optimizer.update``; its auxiliary
    output carries FINCH's statistics beside the loss function's own (see the module's doc)."""
    inputs = self.gen_model_input_fn(inputs)
    grad_fn = nnx.value_and_grad(
      self.loss_fn,
      argnums=nnx.DiffState(0, nnx.LoRAParam) if self._lora_enabled else 0,
      has_aux=self._has_aux,
    )
    out, grads = grad_fn(model, **inputs)
    loss, aux = out if self._has_aux else (out, None)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads, value=self._step_loss(optimizer, loss))
    stats = finch_stats(optimizer.opt_state, self.loss_floor) if self.has_finch else {}
    return loss, {"aux": aux, "finch": stats}, grad_norm

  def _step_loss(self, optimizer: nnx.Optimizer, loss: jax.Array) -> jax.Array:
    """The loss FINCH reads: this batch's, or with gradient accumulation the mean over the
    micro-batches of the optimizer step so far (the mean over all of them on the step's last)."""
    if not self.config.get_with_default("gradient_accumulation_steps", 1) > 1:
      return loss
    # `MultiSteps.mini_step`: how many micro-batches of this optimizer step came before.
    seen = optimizer.opt_state.mini_step[...]
    running = optimizer.finch_micro_batch_loss[...]
    mean = jnp.where(seen == 0, loss, (loss + seen * running) / (seen + 1)).astype(jnp.float32)
    optimizer.finch_micro_batch_loss[...] = mean
    return mean

  def _post_process_train_step(self, aux: Any) -> None:
    """Buffers FINCH's statistics for Tunix's metrics logger, then hands the loss function's
    own auxiliary output to `PeftTrainer`'s hook."""
    buffered = self._buffered_train_metrics.additional_metrics
    for name, value in aux["finch"].items():
      buffered.setdefault(f"finch_{name}", ([], _last))[0].append(value)
    super()._post_process_train_step(aux["aux"])


__all__ = ["FINCH_METRICS", "FinchPeftTrainer", "MicroBatchLoss", "TUNIX_VERSION"]
