"""FINCH inside Tunix's PeftTrainer (`finch_jax.integrations.tunix`) trains as finch_jax does.

Each run is compared with finch_jax's own train step (`finch_jax.trainer.Trainer`) or, for Tunix's
qwix LoRA, with a plain NNX loop that passes `value=loss`, from the same initial weights and data.
Tolerance: both sides compute the same float32 quantities in different XLA programs and, with
gradient accumulation, in a different order (`optax.MultiSteps` keeps a running mean of the
gradients, finch_jax sums each micro-batch's share), so they differ by rounding. Losses and FINCH's
scale agree to 1e-5 relative. Weights agree to 1e-4 absolute: Adam divides each gradient by its own
running magnitude, so for a weight whose gradient is near zero a rounding-sized change of the
gradient moves its step visibly (measured: up to 3.3e-5 after 4 steps); 1e-4 is 1/300 of one
step (learning rate 3e-2), while FINCH reading another loss (the last micro-batch's instead of the
accumulated batch's mean) changes the loss after two steps by 0.4%, 400 times the loss tolerance.
"""

import doctest
import hashlib
import importlib.metadata
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import finch_jax
from finch_jax import sharding as shd
from finch_jax.models import LlamaConfig, build
from finch_jax.trainer import Trainer, token_cross_entropy

tunix_peft = pytest.importorskip("tunix.sft.peft_trainer")  # the `tunix` extra; CI installs it
qwix = pytest.importorskip("qwix")
tunix_integration = pytest.importorskip("finch_jax.integrations.tunix")
FinchPeftTrainer = tunix_integration.FinchPeftTrainer

CONFIG = LlamaConfig.tiny(
  vocab_size=64, max_len=32, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, d_ff=64,
  remat=False,
)  # fmt: skip
LENGTH = 16
LEARNING_RATE = 3e-2
RTOL, ATOL = 1e-5, 1e-4


def make_tx():
  # inject_hyperparams: finch_jax's trainer logs the learning rate it reads from the state.
  return finch_jax.finch(optax.inject_hyperparams(optax.adamw)(learning_rate=LEARNING_RATE))


def micro_batch(index, rows):
  """`rows` sequences: every third micro-batch random tokens (a loss that stays near
  log(vocab)), the others counting 0, 1, 2, 3, 0, ... from a random start (a loss that falls
  within a few steps), so an accumulated batch's mean loss is far from its last micro-batch's
  and FINCH's scale moves."""
  rng = np.random.default_rng(index)
  if index % 3 == 1:
    tokens = rng.integers(0, CONFIG.vocab_size, (rows, LENGTH + 1))
  else:
    tokens = (rng.integers(0, 4, (rows, 1)) + np.arange(LENGTH + 1)) % 4
  tokens = tokens.astype(np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": np.ones((rows, LENGTH), np.float32),
    "segment_ids": np.ones((rows, LENGTH), np.int32),
    "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (rows, 1)),
  }


def loss_fn(model, inputs, targets, weights, segment_ids, positions):
  """Tunix's loss function: the token-weighted mean cross-entropy of the micro-batch."""
  logits = model(inputs, segment_ids=segment_ids, positions=positions)
  loss_sum, weight_sum = token_cross_entropy(logits, targets, weights)
  return loss_sum / jnp.maximum(weight_sum, 1.0)


def interleave(micro_batches):
  """k micro-batches as one batch that finch_jax's trainer splits back into them: its k-th
  micro-batch takes rows k, k + num, k + 2 num, ... (`trainer._split_micro_batches`)."""
  return {
    key: np.stack([m[key] for m in micro_batches], axis=1).reshape(-1, LENGTH)
    for key in micro_batches[0]
  }


def tunix_config(steps, accum=None):
  return tunix_peft.TrainingConfig(
    eval_every_n_steps=10**6, max_steps=steps, gradient_accumulation_steps=accum
  )


def history(trainer, name):
  return np.array(trainer.metrics_logger.get_metric_history("", name, "train"), np.float64)


def pure(state):
  return jax.tree.map(np.asarray, nnx.as_pure(state).to_pure_dict())


def assert_trees_close(a, b):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b, strict=True):
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))


def run_both(steps, accum):
  """The tiny Llama trained `steps` optimizer steps of `accum` micro-batches of 2 rows by Tunix
  with FINCH and by finch_jax's trainer: (Tunix's trainer, its model, finch_jax's metrics per
  step, finch_jax's parameters, the micro-batches)."""
  micro = [micro_batch(i, 2) for i in range(steps * accum)]
  model = build(CONFIG, nnx.Rngs(0))
  start = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model)))

  trainer = FinchPeftTrainer(model, make_tx(), tunix_config(steps, accum if accum > 1 else None))
  trainer.with_loss_fn(loss_fn).train(micro)

  mesh = shd.make_mesh(data=1, devices=jax.devices()[:1])
  own = Trainer(CONFIG, make_tx(), optax.constant_schedule(1.0), mesh, grad_accum_steps=accum)
  state, metrics = own.create_state(start), []
  for i in range(steps):
    batch = own.global_batch(interleave(micro[i * accum : (i + 1) * accum]))
    state, m = own.train_step(state, batch)
    metrics.append(jax.device_get(m))
  return trainer, model, metrics, pure(state.params), micro


@pytest.mark.parametrize("accum,steps", [(1, 6), (3, 4)])
def test_tunix_with_finch_trains_as_finch_jax_does(accum, steps):
  trainer, model, metrics, params, micro = run_both(steps, accum)

  own_loss = np.array([m["loss"] for m in metrics])
  own_scale = np.array([m["finch_scale"] for m in metrics])
  np.testing.assert_allclose(history(trainer, "loss"), own_loss, rtol=RTOL)
  np.testing.assert_allclose(history(trainer, "finch_scale"), own_scale, rtol=RTOL)
  np.testing.assert_allclose(
    history(trainer, "finch_forgetting_bound"), [m["forgetting_bound"] for m in metrics], rtol=RTOL
  )
  assert_trees_close(pure(nnx.state(model, nnx.Param)), params)
  assert trainer.train_steps == steps
  # FINCH moved: the comparison covers the loss reaching it, not only the base optimizer.
  assert own_scale.max() > 1.2, own_scale
  # The loss FINCH read at each step (ema_decay 0: the step's own) is the mean loss Tunix logs for
  # that optimizer step, and its reference the first step's.
  np.testing.assert_allclose(history(trainer, "finch_smoothed_loss"), own_loss, rtol=RTOL)
  np.testing.assert_allclose(history(trainer, "finch_reference_loss"), own_loss[0], rtol=RTOL)
  if accum > 1:
    # With accumulation that mean is far from the last micro-batch's loss, which is what
    # optax.MultiSteps alone would hand FINCH: the equalities above tell them apart.
    last_step = micro[(steps - 1) * accum :]
    micro_losses = [float(loss_fn(model, **m)) for m in last_step]
    assert max(micro_losses) - min(micro_losses) > 1.0, micro_losses
  np.testing.assert_array_equal(history(trainer, "finch_num_skipped"), 0)


def lora_model():
  """The tiny Llama with Tunix's LoRA (qwix) on every attention projection."""
  provider = qwix.LoraProvider(module_path=".*attn", rank=4, alpha=8.0)
  inputs = jnp.zeros((2, LENGTH), jnp.int32)
  return qwix.apply_lora_to_model(build(CONFIG, nnx.Rngs(0)), provider, inputs, rngs=nnx.Rngs(1))


def test_tunix_lora_with_finch_matches_a_plain_nnx_loop():
  steps = 6
  data = [micro_batch(i, 4) for i in range(steps)]

  model = lora_model()
  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam is a kind of Param
  base = pure(nnx.state(model, frozen))
  trainer = FinchPeftTrainer(model, make_tx(), tunix_config(steps))
  trainer.with_loss_fn(loss_fn).train(data)

  plain = lora_model()
  optimizer = nnx.Optimizer(plain, make_tx(), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer, batch):
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
    loss, grads = grad_fn(model, **batch)
    optimizer.update(model, grads, value=loss)
    return loss, finch_jax.finch_stats(optimizer.opt_state)["scale"]

  losses, scales = np.array([jax.device_get(step(plain, optimizer, b)) for b in data]).T

  assert trainer._lora_enabled
  np.testing.assert_allclose(history(trainer, "loss"), losses, rtol=RTOL)
  np.testing.assert_allclose(history(trainer, "finch_scale"), scales, rtol=RTOL)
  adapters = pure(nnx.state(model, nnx.LoRAParam))
  assert len(jax.tree.leaves(adapters)) == 2 * 4 * CONFIG.num_layers  # A and B of q, k, v, o
  assert_trees_close(adapters, pure(nnx.state(plain, nnx.LoRAParam)))
  # Only the adapters trained; B started at zero and moved.
  assert_trees_close(pure(nnx.state(model, frozen)), base)
  assert all(np.abs(b).max() > 1e-3 for b in jax.tree.leaves(adapters)), "an adapter never moved"
  assert np.abs(scales - 1).max() > 0.02, scales


def test_plain_peft_trainer_does_not_hand_the_loss_to_the_optimizer():
  """Why the override exists: Tunix's own step calls `optimizer.update(model, grads)`, and
  FINCH asks for the loss. When this fails, Tunix passes the loss itself: drop the override."""
  trainer = tunix_peft.PeftTrainer(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), make_tx(), tunix_config(1))
  trainer.with_loss_fn(lambda m, x: jnp.mean(m(x) ** 2))
  with pytest.raises(TypeError, match="scale_by_finch needs the batch loss"):
    trainer.train([{"x": jnp.ones((4, 2))}])


# The Tunix surface the override relies on, as in google-tunix 0.1.7. A change here means the
# override must be re-read against the new Tunix (and TUNIX_VERSION and this fingerprint updated).
TRAIN_STEP_SHA256 = "37860367283c3d5fd09c28f34210ae3ca0da4ac5bce42a4994c960530bdfa832"


def test_the_tunix_surface_the_override_relies_on_is_unchanged():
  assert importlib.metadata.version("google-tunix") == tunix_integration.TUNIX_VERSION
  peft = tunix_peft.PeftTrainer
  assert list(inspect.signature(peft._train_step).parameters) == [
    "self", "model", "optimizer", "inputs"
  ]  # fmt: skip
  assert list(inspect.signature(peft._post_process_train_step).parameters) == ["self", "aux"]
  source = inspect.getsource(peft._train_step)
  digest = hashlib.sha256(source.encode()).hexdigest()
  assert digest == TRAIN_STEP_SHA256, (
    f"PeftTrainer._train_step changed (sha256 {digest}): re-read it against "
    "finch_jax.integrations.tunix.FinchPeftTrainer._train_step."
  )
  assert "return self._train_step" in inspect.getsource(peft.create_train_step_fn)
  init = inspect.getsource(peft.__init__)
  assert "optax.MultiSteps(" in init and "self._lora_enabled = " in init
  train = inspect.getsource(peft.train)
  assert train.index("self._buffer_metrics(") < train.index("self._post_process_train_step(aux)")
  assert "mini_step" in optax.MultiStepsState._fields


def test_docstring_example_runs():
  result = doctest.testmod(tunix_integration, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_checkpoints_resume_with_finchs_state(tmp_path):
  """Tunix's checkpoints hold FINCH's state (an optimizer state like any other) and leave out the
  micro-batch loss, which is not read between optimizer steps: a resumed run carries on."""

  def trainer(steps):
    config = tunix_peft.TrainingConfig(
      eval_every_n_steps=10**6,
      max_steps=steps,
      gradient_accumulation_steps=2,
      checkpoint_root_directory=str(tmp_path),
    )
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    out = FinchPeftTrainer(model, make_tx(), config)
    return out.with_loss_fn(lambda m, x, y: jnp.mean((m(x) - y) ** 2))

  data = [
    {"x": np.full((4, 2), i + 1.0, np.float32), "y": np.ones((4, 1), np.float32)} for i in range(8)
  ]
  first = trainer(2)
  first.train(data)
  reference = float(finch_jax.finch_stats(first.optimizer.opt_state)["reference_loss"])
  resumed = trainer(4)
  assert resumed.train_steps == 2
  restored = finch_jax.finch_stats(resumed.optimizer.opt_state)
  assert float(restored["reference_loss"]) == reference > 0
  resumed.train(data)
  assert resumed.train_steps == 4
  np.testing.assert_allclose(history(resumed, "finch_reference_loss"), reference, rtol=1e-6)
