"""The trainer: sharded equals single-device, accumulation feeds the mean loss, resume is exact."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from finch_jax import configure, experiment, find_finch_states, inputs, run
from finch_jax import sharding as shd
from finch_jax import trainer as trainer_lib
from finch_jax.models import LlamaConfig
from finch_jax.optim import make_optimizer
from finch_jax.trainer import Trainer

SMALL_MODEL = LlamaConfig.tiny(
  num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, d_ff=64, max_len=128
)


def small_config(**changes):
  """The default config shrunk to seconds: a one-layer model and 30 biographies."""
  config = default.get_config()
  config.model = SMALL_MODEL.__dict__.copy()
  config.data.options = {"embedded_biographies": {"num_base_people": 20, "num_new_people": 10}}
  config.data.seq_len = 32
  config.data.batch_size = 8
  config.data.eval_examples = 16
  config.data.fact_examples = 16
  config.num_train_steps = 6
  config.log_every = 1
  config.eval_every = 3
  config.checkpoint_every = 3
  config.update_from_flattened_dict(changes)
  return config


def random_batch(rng, batch=8, length=32):
  tokens = rng.integers(3, 259, (batch, length + 1)).astype(np.int32)
  weights = np.ones((batch, length), np.float32)
  weights[: batch // 2, length // 2 :] = 0.0  # uneven weights: micro-batch means differ
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": weights,
    "segment_ids": np.ones((batch, length), np.int32),
    "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
  }


def make_trainer(mesh, accum=1, finch_enabled=True):
  tx, shape = make_optimizer(
    {"name": "adamw", "learning_rate": 3e-3, "grad_clip": 1.0}, {"enabled": finch_enabled}, 10
  )
  return Trainer(SMALL_MODEL, tx, shape, mesh, grad_accum_steps=accum)


def test_sharded_run_matches_one_device():
  one = make_trainer(shd.make_mesh(data=1, devices=jax.devices()[:1]))
  eight = make_trainer(shd.make_mesh(data=4, fsdp=2))
  params = jax.device_get(one.init_params(0))
  s1, s8 = one.create_state(params), eight.create_state(params)
  assert s8.params["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert s8.params["embed"].sharding.mesh.shape["fsdp"] == 2
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = random_batch(rng)
    s1, m1 = one.train_step(s1, one.global_batch(batch))
    s8, m8 = eight.train_step(s8, eight.global_batch(batch))
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["finch_scale"], m8["finch_scale"], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    jax.device_get(s1.params),
    jax.device_get(s8.params),
  )


def test_accumulation_feeds_finch_the_mean_loss_of_the_whole_batch():
  mesh = shd.make_mesh(data=1, devices=jax.devices()[:1])
  whole, accumulated = make_trainer(mesh, accum=1), make_trainer(mesh, accum=4)
  params = jax.device_get(whole.init_params(0))
  batch = random_batch(np.random.default_rng(1))
  s1, m1 = whole.train_step(whole.create_state(params), whole.global_batch(batch))
  s4, m4 = accumulated.train_step(accumulated.create_state(params), accumulated.global_batch(batch))
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  # FINCH took the mean loss as its reference, not the last micro-batch's loss.
  ref = float(find_finch_states(s4.opt_state)[0].reference_loss)
  np.testing.assert_allclose(ref, float(m1["loss"]), rtol=1e-6)
  last_micro = {k: v[3::4] for k, v in batch.items()}
  last_loss = whole.evaluate(s1.params, [last_micro])
  assert abs(last_loss - ref) > 1e-3
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    jax.device_get(s1.params),
    jax.device_get(s4.params),
  )


def test_fact_accuracy_equals_greedy_decoding_that_ends_the_answer(tmp_path):
  from flax import nnx

  from finch_jax import data
  from finch_jax.models import greedy_generate

  config = small_config()
  trainer = configure.make_trainer(config)
  params = trainer.init_params(3)
  facts = inputs.source(config, str(tmp_path), {"name": "", "split": "retain_facts"})
  tokenizer = data.ByteTokenizer()
  batches = list(
    data.fact_batches(facts, tokenizer=tokenizer, max_prompt_len=48, answer_len=40, batch_size=8)
  )[:2]
  # Make some answers right: replace them with the first words the model itself generates,
  # cut where a generated word ends (so decoding then stops the word) or in the middle of one
  # (so the next generated token continues it: not recalled).
  model = nnx.merge(trainer.graphdef, params)
  continues = data.word_continuations(tokenizer, trainer.model_config.vocab_size)
  for b in batches:
    generated = np.asarray(greedy_generate(model, b["prompts"], b["prompt_lengths"], 41))
    for row in range(0, len(generated), 2):
      n = int(b["answer_mask"][row].sum())
      b["answers"][row, :n] = generated[row, :n]
  want = []
  for b in batches:
    generated = np.asarray(greedy_generate(model, b["prompts"], b["prompt_lengths"], 41))
    n = b["answer_mask"].sum(1).astype(int)
    exact = np.all((generated[:, :40] == b["answers"]) | (b["answer_mask"] == 0), axis=1)
    ends = ~continues[generated[np.arange(len(n)), n]]
    want.extend((exact & ends)[b["example_mask"] > 0])
  sums = trainer.fact_sums(params, batches, continues)
  got = float(sums["recalled"]) / float(sums["facts"])
  assert 0 < got < 1
  assert got == pytest.approx(np.mean(want))
  # Exact answers that are cut inside a word were not counted.
  exact_only = []
  for b in batches:
    generated = np.asarray(greedy_generate(model, b["prompts"], b["prompt_lengths"], 40))
    ok = np.all((generated == b["answers"]) | (b["answer_mask"] == 0), axis=1)
    exact_only.extend(ok[b["example_mask"] > 0])
  assert np.mean(exact_only) > got


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_matches_uninterrupted_run_exactly(tmp_path):
  config = small_config()
  straight = str(tmp_path / "straight")
  full = run.run_training(config, straight, progress=False)

  resumed = str(tmp_path / "resumed")
  config.num_train_steps = 3
  run.run_training(config, resumed, progress=False)
  config.num_train_steps = 6
  result = run.run_training(config, resumed, progress=False)

  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(full.state.params),
    jax.device_get(result.state.params),
  )
  assert _losses(resumed) == _losses(straight)
  assert sorted(_losses(straight)) == [1, 2, 3, 4, 5, 6]


def test_finetune_needs_a_base_checkpoint(tmp_path):
  config = small_config(mode="finetune")
  with pytest.raises(ValueError, match="base_checkpoint"):
    experiment.train_and_evaluate(config, str(tmp_path))
  config.base_checkpoint = str(tmp_path / "missing")
  with pytest.raises(ValueError, match="base_checkpoint"):
    experiment.train_and_evaluate(config, str(tmp_path))


def test_finetune_from_base_reports_forgetting(tmp_path):
  base = str(tmp_path / "base")
  experiment.train_and_evaluate(small_config(mode="pretrain"), base)
  config = small_config(mode="finetune", base_checkpoint=base)
  report = experiment.train_and_evaluate(config, str(tmp_path / "ft"))
  entry = report["methods"]["finch"]
  assert entry["forgetting"] == pytest.approx(
    entry["retain_loss_after"] - entry["retain_loss_before"]
  )
  with open(tmp_path / "ft" / "report.json") as f:
    assert json.load(f)["methods"]["finch"]["task_loss"] == pytest.approx(entry["task_loss"])
  # "Before" is the base model itself: the pretraining run's own final evaluation agrees.
  with open(os.path.join(base, "metrics.jsonl")) as f:
    base_eval = [r for r in map(json.loads, f) if "retain_loss" in r][-1]
  assert entry["retain_loss_before"] == pytest.approx(base_eval["retain_loss"], rel=1e-5)


def test_metrics_hold_finch_telemetry(tmp_path):
  config = small_config(num_train_steps=2, eval_every=0)
  run.run_training(config, str(tmp_path), progress=False)
  with open(tmp_path / "metrics.jsonl") as f:
    first = json.loads(f.readline())
  for key in (
    "step",
    "loss",
    "finch_scale",
    "forgetting_bound",
    "effective_learning_rate",
    "tokens_per_second",
    "step_time",
    "input_wait_share",
    "num_skipped",
  ):
    assert key in first
  assert first["finch_scale"] == pytest.approx(1.0)
  assert first["forgetting_bound"] == pytest.approx(np.sqrt(first["loss"]), rel=1e-5)
  assert os.listdir(tmp_path / "tensorboard")


def test_linen_and_mixed_precision_train_step_runs():
  config = SMALL_MODEL.__dict__ | {"dtype": "bfloat16"}
  tx, shape = make_optimizer({"name": "adamw", "learning_rate": 1e-3}, None, 10)
  trainer = Trainer(LlamaConfig(**config), tx, shape, shd.make_mesh(data=-1))
  state = trainer.create_state(trainer.init_params(0))
  state, metrics = trainer.train_step(
    state, trainer.global_batch(random_batch(np.random.default_rng(2)))
  )
  assert state.params["embed"].dtype == jnp.float32  # parameters stay float32
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("kl_weight", [0.0, 0.5], ids=["cross_entropy", "kl_on_replay"])
def test_chunked_loss_trains_as_the_whole_logits(kl_weight):
  """loss_chunk_size makes the logits 12 tokens of each row at a time (32 is no multiple of 12):
  the same loss, KL and gradients as the whole logits, hence the same step, on a sharded mesh
  with accumulation; and the same evaluation."""
  mesh = shd.make_mesh(data=1, fsdp=2, devices=jax.devices()[:2])
  tx, shape = make_optimizer({"name": "adamw", "learning_rate": 3e-3}, {"enabled": True}, 10)
  options = dict(grad_accum_steps=2, kl_weight=kl_weight)
  whole = Trainer(SMALL_MODEL, tx, shape, mesh, **options)
  chunked = Trainer(SMALL_MODEL, tx, shape, mesh, loss_chunk_size=12, **options)
  params = jax.device_get(whole.init_params(0))
  batch = random_batch(np.random.default_rng(3))
  if kl_weight:
    batch["replay"] = (np.arange(8)[:, None] % 3 == 0) * np.ones((8, 32), np.int32)
  results = []
  for trainer in (whole, chunked):
    state = trainer.create_state(params)
    if kl_weight:  # a base that differs from the model, so the KL and its gradient are not 0
      trainer.set_reference(jax.tree.map(lambda x: x * 1.1, params))
    global_batch = trainer.global_batch(batch)
    step = jax.jit(functools.partial(trainer_lib._loss_and_grads, trainer.spec))
    (loss, aux), grads = step(state.params, global_batch, trainer.reference)
    state, metrics = trainer.train_step(state, global_batch)
    evaluation = None if kl_weight else trainer.evaluate(params, [batch])
    results.append((loss, aux, grads, state.params, metrics, evaluation))
  (loss, aux, grads, new, metrics, evaluation), chunked_results = results
  c_loss, c_aux, c_grads, c_new, c_metrics, c_evaluation = chunked_results
  # Per token the same arithmetic on logits made from other shapes, which round differently in
  # the last bit (float32). Measured: loss within 1e-7 relative, gradients within 2e-6 of their
  # largest entry; the KL sum, small differences of log-probabilities, within 3.3e-5.
  np.testing.assert_allclose(c_loss, loss, rtol=1e-6)
  if kl_weight:
    assert float(aux["kl_sum"]) > 1e-2 and c_aux["kl_tokens"] == aux["kl_tokens"]
    np.testing.assert_allclose(c_aux["kl_sum"], aux["kl_sum"], rtol=1e-4)
  for c_grad, grad in zip(jax.tree.leaves(c_grads), jax.tree.leaves(grads), strict=True):
    scale = float(np.abs(grad).max())
    np.testing.assert_allclose(c_grad, grad, rtol=0, atol=1e-5 * scale)
  for key in ("loss", "grad_norm", "finch_scale"):
    np.testing.assert_allclose(c_metrics[key], metrics[key], rtol=1e-5, err_msg=key)
  # Adam's first step moves each weight by about the learning rate, 3e-3, whatever the size of
  # its gradient: the steps agree to within 1e-6 (measured: 3.7e-7).
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
    jax.device_get(c_new),
    jax.device_get(new),
  )
  if not kl_weight:
    np.testing.assert_allclose(c_evaluation, evaluation, rtol=1e-6)


def test_loss_chunk_size_must_be_a_count():
  tx, shape = make_optimizer({"name": "adamw", "learning_rate": 1e-3}, None, 10)
  mesh = shd.make_mesh(data=1, devices=jax.devices()[:1])
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match="loss_chunk_size must be an integer >= 0"):
      Trainer(SMALL_MODEL, tx, shape, mesh, loss_chunk_size=bad)


def test_the_train_step_compiles_once():
  """A fresh state is laid out as the step's output is, so the second step reuses the first's
  program (before: step and num_skipped were uncommitted arrays on one device, the step's output
  replicated over the mesh, and every run compiled its train step twice)."""
  trainer = make_trainer(shd.make_mesh(data=1, devices=jax.devices()[:1]))
  state = trainer.create_state(trainer.init_params(0))
  batch = trainer.global_batch(random_batch(np.random.default_rng(0)))
  for _ in range(3):
    state, _ = trainer.train_step(state, batch)
  assert trainer._train_step._cache_size() == 1
