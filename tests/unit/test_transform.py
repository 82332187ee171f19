"""FINCH behaves as the rule says and like optax's own optimizers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import finch_jax
from finch_jax import FinchState, finch, finch_stats, scale_by_finch


def expected_scales(
  losses,
  *,
  reference_loss=None,
  loss_floor=0.0,
  min_scale=0.1,
  max_scale=4.0,
  ema_decay=0.0,
  reference_steps=1,
  reference_decay=0.0,
):
  """The rule of docs/design.md written out in plain Python, one finite loss after another."""
  scales, m, r, t = [], 0.0, 0.0, 0
  for loss in losses:
    t += 1
    m = ema_decay * m + (1 - ema_decay) * loss
    smoothed = m / (1 - ema_decay**t)
    if reference_loss is not None:
      ref = reference_loss
    elif reference_decay > 0:  # running: the bias-corrected average, this loss included
      r = reference_decay * r + (1 - reference_decay) * loss
      ref = r / (1 - reference_decay**t)
    elif t <= reference_steps:  # the mean of the first reference_steps, this loss included
      ref = sum(losses[:t]) / t
    if smoothed <= loss_floor:
      scales.append(max_scale)
    else:
      s = math.sqrt(max(ref - loss_floor, 0.0) / (smoothed - loss_floor))
      scales.append(min(max(s, min_scale), max_scale))
  return scales


def run_scales(tx, losses, params=None):
  params = {"w": jnp.ones(3)} if params is None else params
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  scales = []
  for loss in losses:
    updates, state = tx.update(grads, state, params, value=jnp.float32(loss))
    scales.append(float(updates["w"][0]))
  return scales, state


LOSSES = [4.0, 3.0, 5.0, 1.0, 0.5, 0.2, 9.0, 0.01]


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"reference_loss": 2.0},
    {"loss_floor": 0.1},
    {"min_scale": 0.8, "max_scale": 1.5},
    {"ema_decay": 0.9},
    {"ema_decay": 0.5, "reference_loss": 3.0, "loss_floor": 0.05, "max_scale": 10.0},
    {"reference_steps": 3},
    {"reference_steps": 2, "ema_decay": 0.5, "loss_floor": 0.05},
    {"reference_decay": 0.8},
    {"reference_decay": 0.9, "ema_decay": 0.5, "loss_floor": 0.05, "max_scale": 10.0},
  ],
)
def test_scale_follows_the_rule(kwargs):
  got, state = run_scales(scale_by_finch(**kwargs), LOSSES)
  want = expected_scales(LOSSES, **kwargs)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert int(state.count) == len(LOSSES)
  np.testing.assert_allclose(float(state.scale), want[-1], rtol=1e-5)


def test_first_scale_is_one_and_scale_rises_as_loss_falls():
  got, _ = run_scales(scale_by_finch(max_scale=100.0), [4.0, 1.0, 0.25])
  np.testing.assert_allclose(got, [1.0, 2.0, 4.0], rtol=1e-6)


def test_loss_at_or_below_floor_gives_max_scale():
  got, _ = run_scales(scale_by_finch(loss_floor=0.5, max_scale=3.0), [2.0, 0.5, 0.1])
  np.testing.assert_allclose(got[1:], [3.0, 3.0])


def test_reference_loss_given_with_max_scale_one_is_a_loss_driven_warmup():
  got, _ = run_scales(scale_by_finch(reference_loss=1.0, max_scale=1.0), [16.0, 4.0, 1.0, 0.5])
  np.testing.assert_allclose(got, [0.25, 0.5, 1.0, 1.0], rtol=1e-6)


# Each reading of the reference on the losses 4, 2, 9, 1 (loss_floor 0, max_scale 10 unless
# given): the scales worked out by hand, and the reference each last step was measured against.
READINGS = [
  ({}, [1.0, math.sqrt(4 / 2), math.sqrt(4 / 9), math.sqrt(4 / 1)], 4.0),
  # The mean of the losses so far until two are in: 4, then (4 + 2) / 2 = 3 from then on.
  ({"reference_steps": 2}, [1.0, math.sqrt(3 / 2), math.sqrt(3 / 9), math.sqrt(3 / 1)], 3.0),
  # Running average of decay 0.5, bias-corrected: 4, 8/3, 44/7, 52/15.
  (
    {"reference_decay": 0.5},
    [1.0, math.sqrt(8 / 3 / 2), math.sqrt(44 / 7 / 9), math.sqrt(52 / 15 / 1)],
    52 / 15,
  ),
  # A target loss of 2 with max_scale 1: slower above the target, the base rate at or below.
  ({"reference_loss": 2.0, "max_scale": 1.0}, [math.sqrt(2 / 4), 1.0, math.sqrt(2 / 9), 1.0], 2.0),
]
READING_LOSSES = [4.0, 2.0, 9.0, 1.0]


@pytest.mark.parametrize("kwargs, scales, reference", READINGS)
def test_each_reading_gives_these_scales(kwargs, scales, reference):
  kwargs = {"max_scale": 10.0, **kwargs}
  got, state = run_scales(scale_by_finch(**kwargs), READING_LOSSES)
  np.testing.assert_allclose(got, scales, rtol=1e-6)
  # finch(base, ...) takes the same keywords.
  np.testing.assert_allclose(run_scales(finch(optax.identity(), **kwargs), READING_LOSSES)[0], got)
  # The state has the same five scalars in every reading, so checkpoints keep their tree.
  assert jax.tree.structure(state) == jax.tree.structure(scale_by_finch().init({"w": 0.0}))
  stats = finch_stats(state)
  np.testing.assert_allclose(float(stats["reference_loss"]), reference, rtol=1e-6)
  np.testing.assert_allclose(float(stats["scale"]), scales[-1], rtol=1e-6)
  np.testing.assert_allclose(float(stats["forgetting_bound"]), scales[-1] * 1.0, rtol=1e-6)
  if scales[-1] < kwargs["max_scale"]:  # not clipped: FINCH held the bound at sqrt(L_ref)
    np.testing.assert_allclose(float(stats["forgetting_bound"]), math.sqrt(reference), rtol=1e-6)


def test_running_reference_follows_the_trend_and_first_does_not():
  # A loss falling 10% a step: measured against the first loss the scale climbs to max_scale;
  # against a running average of decay d it settles at sqrt((1 - d) / (1 - d / 0.9)).
  losses = [10.0 * 0.9**t for t in range(120)]
  first, _ = run_scales(scale_by_finch(max_scale=100.0), losses)
  running, _ = run_scales(scale_by_finch(max_scale=100.0, reference_decay=0.5), losses)
  assert first[-1] == 100.0
  np.testing.assert_allclose(running[60:], math.sqrt(0.5 / (1 - 0.5 / 0.9)), rtol=1e-5)
  # A batch 4x harder than the trend is scaled down against it: the average before it is
  # 1.125 times the loss a step earlier, 1.125 / 0.9 times the trend's loss L now; with this
  # batch it is 0.5 * 1.25 L + 0.5 * 4 L = 2.625 L.
  spiked, _ = run_scales(
    scale_by_finch(max_scale=100.0, reference_decay=0.5), [*losses[:100], 4 * losses[100]]
  )
  np.testing.assert_allclose(spiked[-1], math.sqrt(2.625 / 4), rtol=1e-4)


def test_state_is_five_scalars_whatever_the_model_size():
  big = {"a": jnp.zeros((256, 256)), "b": jnp.zeros((1000,))}
  state = scale_by_finch().init(big)
  assert isinstance(state, FinchState)
  assert all(x.shape == () for x in state)
  assert sum(x.size for x in state) == 5


def test_jit_matches_eager():
  tx = finch(optax.adam(0.1), ema_decay=0.3)
  params = {"w": jnp.arange(4.0), "b": jnp.ones(())}
  f = lambda p: jnp.sum(p["w"] ** 2) + p["b"] ** 2

  def step(params, state):
    loss, grads = jax.value_and_grad(f)(params)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  p1, s1 = params, tx.init(params)
  p2, s2 = params, tx.init(params)
  jstep = jax.jit(step)
  for _ in range(5):
    p1, s1 = step(p1, s1)
    p2, s2 = jstep(p2, s2)
  chex_close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
  jax.tree.map(chex_close, p1, p2)
  jax.tree.map(chex_close, s1, s2)


def _per_device_problem(n):
  """n devices, each with its own quadratic: local losses differ, so does a wrong mean."""
  targets = jnp.arange(1.0, n + 1.0)[:, None] * jnp.ones((n, 3))
  params = jnp.zeros(3)

  def local_loss(p, target):
    return jnp.sum((p - target) ** 2)

  return targets, params, local_loss


def test_pmap_with_axis_name_uses_global_mean_loss():
  n = jax.local_device_count()
  assert n == 8
  targets, params, local_loss = _per_device_problem(n)
  tx = finch(optax.sgd(0.01), axis_name="batch", max_scale=100.0)
  state = tx.init(params)

  def step(params, state, target):
    loss, grads = jax.value_and_grad(local_loss)(params, target)
    grads = jax.lax.pmean(grads, "batch")
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  rep = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)
  pstep = jax.pmap(step, axis_name="batch")
  p, s = rep(params), rep(state)
  losses = []
  for _ in range(3):
    p, s, loss = pstep(p, s, targets)
    losses.append(float(loss.mean()))
  # Every device ends with the same parameters and the same FINCH state.
  np.testing.assert_allclose(np.asarray(p), np.broadcast_to(np.asarray(p[0]), p.shape))
  scales = np.asarray(s[1].scale)
  np.testing.assert_allclose(scales, scales[0])
  want = expected_scales(losses, max_scale=100.0)[-1]
  np.testing.assert_allclose(scales[0], want, rtol=1e-5)


@pytest.mark.parametrize("reading", [{}, {"reference_steps": 2}, {"reference_decay": 0.5}])
def test_shard_map_with_axis_name_uses_global_mean_loss(reading):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  targets, params, local_loss = _per_device_problem(8)
  targets = jax.device_put(targets, NamedSharding(mesh, P("data")))
  tx = scale_by_finch(axis_name="data", max_scale=100.0, **reading)
  state = tx.init(params)
  losses = []

  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P(), P("data"))
  )
  def step(params, state, target):
    loss, grads = jax.value_and_grad(local_loss)(params, target[0])
    grads = jax.lax.pmean(grads, "data")
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss[None]

  step = jax.jit(step)
  for _ in range(4):
    params, state, loss = step(params, state, targets)
    losses.append(float(jnp.mean(loss)))
  want = expected_scales(losses, max_scale=100.0, **reading)
  assert want[-1] != expected_scales(losses[-1:], max_scale=100.0)[-1]
  np.testing.assert_allclose(float(state.scale), want[-1], rtol=1e-5)


def _mlp_problem():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {
    "w1": jax.random.normal(k1, (16, 32)) * 0.3,
    "w2": jax.random.normal(k2, (32, 1)) * 0.3,
  }
  x = jax.random.normal(k3, (64, 16))
  y = jnp.sin(x.sum(axis=1, keepdims=True))

  def loss_fn(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

  return params, x, y, loss_fn


def _train(tx, params, x, y, loss_fn, steps=6):
  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state, x, y)
  return params, state


def test_jit_over_sharded_arrays_matches_one_device():
  params, x, y, loss_fn = _mlp_problem()
  tx = finch(optax.adamw(1e-2))
  want_p, want_s = _train(tx, params, x, y, loss_fn)

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shard = lambda spec: NamedSharding(mesh, spec)
  sparams = {
    "w1": jax.device_put(params["w1"], shard(P(None, "model"))),
    "w2": jax.device_put(params["w2"], shard(P("model", None))),
  }
  got_p, got_s = _train(
    tx, sparams, jax.device_put(x, shard(P("data"))), jax.device_put(y, shard(P("data"))), loss_fn
  )
  assert got_p["w1"].sharding.spec == P(None, "model")
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, want_p, got_p)
  jax.tree.map(close, want_s, got_s)


@pytest.mark.parametrize("use_jit", [False, True])
def test_explicit_mesh_state_types_stable(use_jit):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = {"w": jax.device_put(jnp.ones((8, 4)), P("data", None)), "b": jnp.zeros(4)}
    tx = finch(optax.adam(1e-2))
    init = jax.jit(tx.init) if use_jit else tx.init
    state = init(params)

    def step(params, state):
      loss, grads = jax.value_and_grad(lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"]))(params)
      return tx.update(grads, state, params, value=loss)

    step = jax.jit(step) if use_jit else step
    updates, new_state = step(params, state)
    types = lambda tree: jax.tree.map(jax.typeof, tree)
    assert types(new_state) == types(state)
    assert types(updates) == types(params)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(min_scale=0.2, max_scale=3.0, ema_decay=0.5, loss_floor=0.1),
    dict(min_scale=0.2, max_scale=3.0, reference_steps=3),
    dict(min_scale=0.2, max_scale=3.0, ema_decay=0.5, reference_decay=0.8),
  ],
)
def test_inject_hyperparams_matches_plain_transform(kwargs):
  plain = scale_by_finch(**kwargs)
  injected = optax.inject_hyperparams(scale_by_finch)(**kwargs)
  params = {"w": jnp.ones(2)}
  s_plain, s_inj = plain.init(params), injected.init(params)
  update_inj = jax.jit(injected.update)
  for loss in LOSSES:
    u1, s_plain = plain.update(params, s_plain, params, value=loss)
    u2, s_inj = update_inj(params, s_inj, params, value=jnp.float32(loss))
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s_plain, s_inj.inner_state)
  # Changing an injected hyper-parameter takes effect on the next step.
  s_inj.hyperparams["max_scale"] = jnp.float32(1.0)
  u, _ = update_inj(params, s_inj, params, value=jnp.float32(1e-3))
  np.testing.assert_allclose(u["w"], 1.0, rtol=1e-6)


def test_chain_with_reduce_on_plateau_both_read_value():
  tx = optax.chain(
    optax.sgd(1.0),
    scale_by_finch(max_scale=100.0),
    optax.contrib.reduce_on_plateau(factor=0.5, patience=1, accumulation_size=1),
  )
  params = {"w": jnp.ones(1)}
  state = tx.init(params)
  scales = []
  for loss in [1.0, 1.0, 1.0, 1.0]:
    updates, state = tx.update({"w": jnp.ones(1)}, state, params, value=loss)
    scales.append(-float(updates["w"][0]))
  # FINCH keeps scale 1 on a flat loss; the plateau halves the step once patience runs out.
  assert scales[0] == 1.0
  assert scales[-1] < scales[0]
  assert float(state[2].scale) < 1.0
  assert int(state[1].count) == 4


def test_multisteps_zero_updates_on_inner_micro_steps():
  tx = optax.MultiSteps(finch(optax.sgd(1.0)), every_k_schedule=3)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i, loss in enumerate([4.0, 4.0, 4.0, 1.0, 1.0, 1.0]):
    updates, state = update({"w": jnp.ones(2)}, state, params, value=jnp.float32(loss))
    if i % 3 != 2:
      np.testing.assert_array_equal(updates["w"], 0.0)
    else:
      assert float(jnp.abs(updates["w"]).min()) > 0
  stats = finch_stats(state)
  assert int(finch_jax.find_finch_states(state)[0].count) == 2
  np.testing.assert_allclose(float(stats["scale"]), 2.0, rtol=1e-6)


def test_learning_rate_schedule_in_base_still_applies():
  schedule = optax.linear_schedule(1.0, 0.0, transition_steps=4)
  tx = finch(optax.sgd(schedule), max_scale=100.0)
  params = {"w": jnp.ones(1)}
  state = tx.init(params)
  losses = [4.0, 1.0, 1.0, 0.25]
  scales = expected_scales(losses, max_scale=100.0)
  for t, loss in enumerate(losses):
    updates, state = tx.update({"w": jnp.ones(1)}, state, params, value=loss)
    np.testing.assert_allclose(-float(updates["w"][0]), float(schedule(t)) * scales[t], rtol=1e-6)


def test_init_from_shape_dtype_structs():
  abstract = {"w": jax.ShapeDtypeStruct((3, 4), jnp.bfloat16)}
  state = scale_by_finch().init(abstract)
  assert state.smoothed_loss.dtype == jnp.float32
  shapes = jax.eval_shape(finch(optax.adamw(1e-3)).init, abstract)
  assert shapes[0][0].mu["w"].shape == (3, 4)
  assert shapes[1].scale.shape == ()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("value_dtype", [jnp.bfloat16, jnp.float32, jnp.int32])
def test_updates_keep_param_dtype_and_state_dtypes_are_stable(dtype, value_dtype):
  params = {"w": jnp.ones(4, dtype)}
  tx = finch(optax.adam(1e-2))
  state = tx.init(params)
  grads = {"w": jnp.full(4, 0.5, dtype)}
  value = jnp.asarray(3, value_dtype)

  def maybe_update(pred, state):
    # Both branches of a cond must agree on types: a dtype drift in the state fails here.
    return jax.lax.cond(
      pred,
      lambda s: tx.update(grads, s, params, value=value),
      lambda s: (jax.tree.map(jnp.zeros_like, grads), s),
      state,
    )

  updates, new_state = jax.jit(maybe_update)(True, state)
  assert updates["w"].dtype == dtype
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)


def _minimise(tx, f, x0, steps):
  @jax.jit
  def step(x, state):
    loss, g = jax.value_and_grad(f)(x)
    u, state = tx.update(g, state, x, value=loss)
    return optax.apply_updates(x, u), state

  x, state = x0, tx.init(x0)
  for _ in range(steps):
    x, state = step(x, state)
  return x


def rosenbrock(x):
  return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def quadratic(x):
  return 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * (x - 1.0) ** 2)


@pytest.mark.parametrize(
  "name,base,f,x0,steps,tol",
  [
    ("sgd-quadratic", optax.sgd(0.05), quadratic, jnp.zeros(4), 500, 1e-4),
    ("adam-quadratic", optax.adam(0.01), quadratic, jnp.zeros(4), 3000, 1e-3),
    (
      "sgd-rosenbrock",
      optax.sgd(5e-4, momentum=0.9),
      rosenbrock,
      jnp.array([-1.0, 1.0]),
      20000,
      1e-2,
    ),
    ("adam-rosenbrock", optax.adam(5e-3), rosenbrock, jnp.array([-1.0, 1.0]), 5000, 1e-2),
  ],
)
def test_converges_on_small_problems(name, base, f, x0, steps, tol):
  x = _minimise(finch(base), f, x0, steps)
  np.testing.assert_allclose(x, jnp.ones_like(x0), atol=tol, err_msg=name)


def test_missing_value_says_how_to_pass_it():
  tx = scale_by_finch()
  params = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match=r"value=loss"):
    tx.update(params, tx.init(params), params)


def test_non_scalar_value_is_rejected():
  tx = scale_by_finch()
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"scalar"):
    tx.update(params, tx.init(params), params, value=jnp.ones(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_skips_step_and_next_step_proceeds(bad):
  tx = finch(optax.adam(0.1), ema_decay=0.5)
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.array([1.0, -2.0, 3.0])}
  zeros = {"w": jnp.zeros(3)}
  update = jax.jit(tx.update)

  # The reference run sees a zero gradient where the bad batch was, and FINCH never
  # sees that batch's loss.
  ref_base, ref_finch = optax.adam(0.1), scale_by_finch(ema_decay=0.5)
  rb, rf = ref_base.init(params), ref_finch.init(params)
  for g, loss in [(grads, 2.0), (zeros, None), (grads, 1.0)]:
    want, rb = ref_base.update(g, rb, params)
    if loss is not None:
      want, rf = ref_finch.update(want, rf, params, value=loss)

  state = tx.init(params)
  _, state = update(grads, state, params, value=jnp.float32(2.0))
  nan_grads = {"w": jnp.full(3, jnp.nan)}
  skipped, after_bad = update(nan_grads, state, params, value=jnp.float32(bad))
  np.testing.assert_array_equal(skipped["w"], 0.0)
  # FINCH's statistics are as before the bad batch, and there is no NaN anywhere.
  assert int(after_bad[1].num_skipped) == 1
  jax.tree.map(
    np.testing.assert_array_equal,
    after_bad[1]._replace(num_skipped=0),
    state[1]._replace(num_skipped=0),
  )
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(after_bad))

  got, after = update(grads, after_bad, params, value=jnp.float32(1.0))
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-6)
  jax.tree.map(close, after[0], rb)
  jax.tree.map(close, after[1]._replace(num_skipped=0), rf)


@pytest.mark.parametrize("kwargs, _scales, _reference", READINGS)
def test_non_finite_losses_leave_every_reading_alone(kwargs, _scales, _reference):
  kwargs = {"max_scale": 10.0, "ema_decay": 0.3, **kwargs}
  nan, inf = float("nan"), float("inf")
  # Bad batches first, inside the first k, and later: none counts as a step.
  with_bad = [nan, 4.0, inf, 2.0, 9.0, -inf, nan, 1.0]
  clean, clean_state = run_scales(scale_by_finch(**kwargs), READING_LOSSES)
  got, state = run_scales(scale_by_finch(**kwargs), with_bad)
  finite = np.isfinite(with_bad)
  np.testing.assert_array_equal(np.asarray(got)[~finite], 0.0)
  np.testing.assert_array_equal(np.asarray(got)[finite], clean)
  assert int(state.num_skipped) == 4
  jax.tree.map(np.testing.assert_array_equal, state._replace(num_skipped=0), clean_state)


def test_first_loss_not_finite_does_not_become_the_reference():
  _, state = run_scales(scale_by_finch(), [float("nan"), 3.0, 0.75])
  np.testing.assert_allclose(float(state.reference_loss), 3.0)
  np.testing.assert_allclose(float(state.scale), 2.0, rtol=1e-6)
  assert int(state.num_skipped) == 1 and int(state.count) == 2


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"max_scale": 0.0}, "max_scale"),
    ({"max_scale": -1.0}, "max_scale"),
    ({"min_scale": 2.0, "max_scale": 1.0}, "min_scale"),
    ({"min_scale": -0.1}, "min_scale"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"ema_decay": -0.1}, "ema_decay"),
    ({"reference_loss": 0.0}, "reference_loss"),
    ({"reference_loss": 1.0, "loss_floor": 2.0}, "reference_loss"),
    ({"loss_floor": float("nan")}, "loss_floor"),
    ({"reference_steps": 0}, "reference_steps"),
    ({"reference_steps": 2.5}, "reference_steps"),
    ({"reference_decay": 1.0}, "reference_decay"),
    ({"reference_decay": -0.1}, "reference_decay"),
    ({"reference_steps": 3, "reference_loss": 2.0}, "reference_steps .* reference_loss"),
    ({"reference_decay": 0.9, "reference_loss": 2.0}, "reference_decay .* reference_loss"),
    ({"reference_decay": 0.9, "reference_steps": 3}, "two readings"),
    ({"reference_decay": 0.5, "ema_decay": 0.5}, "must exceed ema_decay"),
  ],
)
def test_invalid_hyperparameters_raise_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    scale_by_finch(**kwargs)
  with pytest.raises(ValueError, match=match):
    finch(optax.sgd(0.1), **kwargs)


def test_hyperparameter_checks_do_not_break_when_traced():
  @jax.jit
  def make_and_step(max_scale):
    tx = scale_by_finch(max_scale=max_scale)
    params = {"w": jnp.ones(1)}
    u, _ = tx.update(params, tx.init(params), params, value=jnp.float32(1.0))
    return u["w"]

  np.testing.assert_allclose(make_and_step(2.0), 1.0)


def test_finch_stats_reads_nested_states():
  params = {"w": jnp.ones(2)}
  for tx in [
    finch(optax.adam(0.1)),
    optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(scale_by_finch)()),
    optax.MultiSteps(finch(optax.sgd(0.1)), every_k_schedule=1),
  ]:
    state = tx.init(params)
    for loss in [4.0, 1.0]:
      _, state = tx.update(params, state, params, value=loss)
    stats = finch_stats(state, loss_floor=0.0)
    np.testing.assert_allclose(float(stats["scale"]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(stats["reference_loss"]), 4.0)
    # FINCH holds scale * sqrt(L) at sqrt(L_ref) = 2 while the scale is not clipped.
    np.testing.assert_allclose(float(stats["forgetting_bound"]), 2.0, rtol=1e-6)
    assert int(stats["num_skipped"]) == 0
  with pytest.raises(ValueError, match="exactly one"):
    finch_stats(optax.adam(0.1).init(params))


def test_nnx_optimizer_passes_value():
  from flax import nnx

  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, finch(optax.sgd(0.1)), wrt=nnx.Param)
  x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads, value=loss)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(3)]
  assert losses[-1] < losses[0]
  stats = finch_stats(optimizer.opt_state)
  np.testing.assert_allclose(float(stats["reference_loss"]), losses[0], rtol=1e-6)
  np.testing.assert_allclose(float(stats["scale"]), math.sqrt(losses[0] / losses[-1]), rtol=1e-5)


def test_linen_train_state_passes_value():
  import flax.linen as nn

  model = nn.Dense(1)
  x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
  state = finch_jax.linen.TrainState.create(
    apply_fn=model.apply,
    params=model.init(jax.random.key(0), x),
    tx=finch(optax.sgd(0.1)),
  )

  @jax.jit
  def train_step(state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2))(
      state.params
    )
    return state.apply_gradients(grads=grads, value=loss), loss

  losses = []
  for _ in range(3):
    state, loss = train_step(state)
    losses.append(float(loss))
  assert int(state.step) == 3 and losses[-1] < losses[0]
  np.testing.assert_allclose(
    float(finch_stats(state.opt_state)["scale"]), math.sqrt(losses[0] / losses[-1]), rtol=1e-5
  )
