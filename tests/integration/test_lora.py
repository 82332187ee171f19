"""Tests for LoRA adapters: counts, identity at init, training, rank, errors and sharding."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import finch_jax.lora
from finch_jax import lora, sharding
from finch_jax.models import Llama, LlamaConfig

TINY = LlamaConfig.tiny()  # 4 layers, d_model 96, 4 heads of 24, 2 kv heads, d_ff 256
SMALL = LlamaConfig.tiny(num_layers=2)
QWEN = LlamaConfig(
  vocab_size=128,
  d_model=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=24,  # heads * head_dim = 96 != d_model: q_proj and o_proj are not square
  d_ff=96,
  model_type="qwen3",
)


@functools.cache
def build(config):
  """(graphdef, pure parameter state) of the model for `config`; arrays are immutable, so shared."""
  graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
  return graphdef, nnx.as_pure(state)


@jax.jit(static_argnums=2)
def forward(params, tokens, graphdef):
  return nnx.merge(graphdef, params)(tokens)


def random_tokens(config, shape=(4, 32), seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size)


def randomize_b(adapters, seed=1):
  """The adapters with every B drawn from normal(0, 1), so each delta is non-zero."""
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))

  def draw(path, x):
    if path[-1].key != "b":
      return x
    if isinstance(x, nnx.Variable):
      return x.replace(jax.random.normal(next(keys), x.shape))
    return jax.random.normal(next(keys), x.shape)

  is_variable = lambda x: isinstance(x, nnx.Variable)
  return jax.tree_util.tree_map_with_path(draw, adapters, is_leaf=is_variable)


# ----- counts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "model_config, lora_config, expected",
  [
    # per layer, rank 4: q 4*(96+96) + k, v 4*(96+48) + o 4*(96+96) + gate, up, down 4*(96+256)
    (TINY, lora.LoraConfig(rank=4, alpha=8.0), 4 * (768 + 2 * 576 + 768 + 3 * 1408)),
    (LlamaConfig.tiny(tie_embeddings=False), lora.LoraConfig(rank=4, alpha=8.0), 27648),
    # per layer, rank 4: q, o 4*(64+96); k, v 4*(64+48); gate, up, down 4*(64+96)
    (QWEN, lora.LoraConfig(rank=4, alpha=4.0), 2 * (5 * 640 + 2 * 448)),
    # q 2*(96+96), v 2*(96+48)
    (TINY, lora.LoraConfig(rank=2, alpha=1.0, targets=("q_proj", "v_proj")), 4 * (384 + 288)),
  ],
)
def test_param_count_matches_formula(model_config, lora_config, expected):
  _, params = build(model_config)
  adapters = lora.init_lora(params, lora_config, jax.random.key(0))
  assert lora.num_params(adapters) == expected
  assert lora.expected_num_params(model_config, lora_config) == expected
  found = {path[-2].key for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
  assert found == set(lora_config.targets)
  fraction = lora.trainable_fraction(adapters, params)
  assert fraction == pytest.approx(expected / (model_config.num_params() + expected))


def test_adapter_shapes_and_init():
  _, params = build(TINY)
  adapters = lora.init_lora(params, lora.LoraConfig(rank=8, alpha=16.0), jax.random.key(0))
  block = adapters["blocks"][3]
  shapes = {
    name: (pair["a"].shape, pair["b"].shape)
    for group in ("attn", "mlp")
    for name, pair in block[group].items()
  }
  assert shapes == {
    "q_proj": ((96, 8), (8, 4, 24)),
    "k_proj": ((96, 8), (8, 2, 24)),
    "v_proj": ((96, 8), (8, 2, 24)),
    "o_proj": ((4, 24, 8), (8, 96)),
    "gate_proj": ((96, 8), (8, 256)),
    "up_proj": ((96, 8), (8, 256)),
    "down_proj": ((256, 8), (8, 96)),
  }
  for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    assert leaf.dtype == jnp.float32
    if path[-1].key == "b":
      assert not np.any(np.asarray(leaf))
  # A ~ normal(0, 1 / fan_in); each kernel draws its own.
  a = np.asarray(block["mlp"]["down_proj"]["a"])
  assert np.std(a) * np.sqrt(256) == pytest.approx(1.0, abs=0.1)
  assert not np.allclose(block["mlp"]["gate_proj"]["a"], block["mlp"]["up_proj"]["a"])
  again = lora.init_lora(params, lora.LoraConfig(rank=8, alpha=16.0), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, adapters, again)


# ----- identity at init ----------------------------------------------------------------------


@pytest.mark.parametrize("model_config", [TINY, QWEN, QWEN.replace(param_dtype="bfloat16")])
def test_merged_model_equals_base_at_init(model_config):
  graphdef, params = build(model_config)
  config = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = lora.init_lora(params, config, jax.random.key(1))
  merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, config)
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
    assert m.dtype == p.dtype == jnp.dtype(model_config.param_dtype)
  tokens = random_tokens(model_config)
  np.testing.assert_array_equal(
    forward(merged, tokens, graphdef), forward(params, tokens, graphdef)
  )


def test_merge_of_a_variable_state_updates_the_model():
  model = Llama(SMALL, rngs=nnx.Rngs(0))
  config = lora.LoraConfig(rank=2, alpha=2.0, targets=("v_proj", "down_proj"))
  adapters = randomize_b(lora.init_lora(nnx.state(model), config, jax.random.key(0)))
  assert isinstance(adapters["blocks"][0]["mlp"]["down_proj"]["b"], nnx.Param)
  pure = lora.merge(nnx.as_pure(nnx.state(model)), nnx.as_pure(adapters), config)
  merged = lora.merge(nnx.state(model), adapters, config)
  assert merged["blocks"][1]["attn"]["v_proj"].get_metadata()["out_sharding"] == (
    "embed",
    "kv_heads",
    "head_dim",
  )
  nnx.update(model, merged)
  jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(nnx.state(model)), pure)
  assert not np.array_equal(
    pure["blocks"][1]["attn"]["v_proj"], build(SMALL)[1]["blocks"][1]["attn"]["v_proj"]
  )


# ----- training ------------------------------------------------------------------------------


def cross_entropy(logits, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


@pytest.fixture(scope="module")
def trained():
  """SMALL trained for 10 Adam steps through its adapters on one batch of random tokens."""
  graphdef, base = build(SMALL)
  config = lora.LoraConfig(rank=4, alpha=8.0)
  adapters = lora.init_lora(base, config, jax.random.key(1))
  tx = optax.adam(1e-2)
  tokens = random_tokens(SMALL, (4, 32))
  base_before = jax.tree.map(np.array, base)

  def loss_fn(adapters, base):
    return cross_entropy(nnx.merge(graphdef, lora.merge(base, adapters, config))(tokens), tokens)

  @jax.jit
  def step(adapters, opt_state, base):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, base)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss, grads

  opt_state = tx.init(adapters)
  losses, first_grads = [], None
  for _ in range(10):
    adapters, opt_state, loss, grads = step(adapters, opt_state, base)
    losses.append(float(loss))
    first_grads = grads if first_grads is None else first_grads
  final_loss = float(jax.jit(loss_fn)(adapters, base))
  lora_logits = jax.jit(lambda a, b: nnx.merge(graphdef, lora.merge(b, a, config))(tokens))
  return dict(
    graphdef=graphdef,
    base=base,
    base_before=base_before,
    config=config,
    adapters=adapters,
    tokens=tokens,
    losses=[*losses, final_loss],
    first_grads=first_grads,
    lora_logits=lora_logits(adapters, base),
  )


def test_training_adapters_lowers_the_loss_and_leaves_the_base(trained):
  losses = trained["losses"]
  assert losses[0] == pytest.approx(np.log(SMALL.vocab_size), rel=0.05)
  assert losses[-1] < losses[0] - 0.5, losses
  # With B = 0 the first step moves only B: A's gradients are exactly zero, B's are not.
  grads = trained["first_grads"]["blocks"][0]["mlp"]["up_proj"]
  assert not np.any(np.asarray(grads["a"]))
  assert np.any(np.asarray(grads["b"]))
  jax.tree.map(np.testing.assert_array_equal, trained["base"], trained["base_before"])


def test_merged_model_matches_explicit_low_rank_forward(trained):
  graphdef, base, config = trained["graphdef"], trained["base"], trained["config"]
  adapters, tokens = trained["adapters"], trained["tokens"]
  merged = lora.merge(base, adapters, config)

  # A plain model built from copies of the merged weights scores the batch as the adapted model
  # did in training, with the same logits.
  plain = jax.tree.map(np.array, merged)
  plain_logits = forward(plain, tokens, graphdef)
  assert float(cross_entropy(plain_logits, tokens)) == pytest.approx(trained["losses"][-1], 1e-5)
  np.testing.assert_allclose(plain_logits, trained["lora_logits"], rtol=1e-5, atol=1e-5)

  # Each projection with merged weights equals x @ W + scale * (x @ A) @ B, computed apart.
  s = config.scale
  x = jax.random.normal(jax.random.key(2), (2, 5, SMALL.d_model))
  for b in range(SMALL.num_layers):
    w, ad, mw = base["blocks"][b], adapters["blocks"][b], merged["blocks"][b]
    for name in ("q_proj", "k_proj", "v_proj"):
      lo = jnp.einsum("btd,dr,rnh->btnh", x, ad["attn"][name]["a"], ad["attn"][name]["b"])
      want = jnp.einsum("btd,dnh->btnh", x, w["attn"][name]) + s * lo
      got = jnp.einsum("btd,dnh->btnh", x, mw["attn"][name])
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    heads = jax.random.normal(jax.random.key(3), (2, 5, SMALL.num_heads, 24))
    o = ad["attn"]["o_proj"]
    want = jnp.einsum("btnh,nhd->btd", heads, w["attn"]["o_proj"]) + s * jnp.einsum(
      "btnh,nhr,rd->btd", heads, o["a"], o["b"]
    )
    got = jnp.einsum("btnh,nhd->btd", heads, mw["attn"]["o_proj"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(s * jnp.einsum("btnh,nhr,rd->btd", heads, o["a"], o["b"])).max() > 1e-3

    # The whole SwiGLU MLP, adapted explicitly, against the model's MLP with merged weights.
    mlp_w, mlp_ad = w["mlp"], ad["mlp"]
    proj = lambda h, name: h @ mlp_w[name] + s * (h @ mlp_ad[name]["a"]) @ mlp_ad[name]["b"]  # noqa: B023
    want = proj(jax.nn.silu(proj(x, "gate_proj")) * proj(x, "up_proj"), "down_proj")
    got = nnx.merge(graphdef, merged).blocks[b].mlp(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_config", [SMALL, QWEN])
def test_each_delta_has_at_most_the_adapter_rank(model_config):
  _, params = build(model_config)
  config = lora.LoraConfig(rank=3, alpha=6.0)
  adapters = randomize_b(lora.init_lora(params, config, jax.random.key(0)))
  merged = jax.jit(lora.merge, static_argnums=2)(params, adapters, config)
  deltas = lora.delta_matrices(adapters, config)
  assert len(deltas) == 7 * model_config.num_layers
  for path, delta in deltas.items():
    keys = path.split("/")
    kernel = params["blocks"][int(keys[1])][keys[2]][keys[3]]
    merged_kernel = merged["blocks"][int(keys[1])][keys[2]][keys[3]]
    n_in = 2 if keys[3] == "o_proj" else 1
    rows = int(np.prod(kernel.shape[:n_in]))
    from_merge = (np.asarray(merged_kernel, np.float64) - np.asarray(kernel, np.float64)).reshape(
      rows, -1
    )
    np.testing.assert_allclose(from_merge, delta, atol=1e-5)
    assert np.linalg.matrix_rank(from_merge, tol=1e-4 * np.abs(delta).max()) == config.rank
    assert np.linalg.matrix_rank(delta) == config.rank


# ----- errors --------------------------------------------------------------------------------


def test_bad_configs_name_the_fix():
  with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 0"):
    lora.LoraConfig(rank=0, alpha=1.0)
  with pytest.raises(ValueError, match=r"alpha must be a positive number"):
    lora.LoraConfig(rank=4, alpha=0.0)
  with pytest.raises(ValueError, match=r"Unknown LoRA targets \['qkv'\]: valid targets are "):
    lora.LoraConfig(rank=4, alpha=1.0, targets=("q_proj", "qkv"))
  with pytest.raises(ValueError, match=r"write targets=\('q_proj',\)"):
    lora.LoraConfig(rank=4, alpha=1.0, targets="q_proj")
  with pytest.raises(ValueError, match=r"names a projection twice"):
    lora.LoraConfig(rank=4, alpha=1.0, targets=("q_proj", "q_proj"))
  assert lora.LoraConfig(rank=4, alpha=1.0, targets=["v_proj"]).targets == ("v_proj",)


def test_targets_absent_from_the_model_and_mismatched_adapters():
  _, params = build(SMALL)
  attention_only = {"blocks": {0: {"attn": dict(params["blocks"][0]["attn"])}}}
  config = lora.LoraConfig(rank=2, alpha=2.0, targets=("q_proj", "gate_proj", "down_proj"))
  with pytest.raises(
    ValueError, match=r"targets \['gate_proj', 'down_proj'\] are not in the parameters"
  ):
    lora.init_lora(attention_only, config, jax.random.key(0))
  with pytest.raises(ValueError, match=r"expects a rank-2 up_proj kernel .* got rank 4"):
    lora.init_lora(
      {"up_proj": jnp.zeros((4, 4, 4, 4))},
      lora.LoraConfig(2, 2.0, ("up_proj",)),
      jax.random.key(0),
    )

  adapters = lora.init_lora(params, lora.LoraConfig(rank=2, alpha=2.0), jax.random.key(0))
  with pytest.raises(ValueError, match=r"have rank 2, but LoraConfig.rank is 4"):
    lora.merge(params, adapters, lora.LoraConfig(rank=4, alpha=2.0))
  with pytest.raises(ValueError, match=r"include \['down_proj', 'gate_proj'"):
    lora.merge(params, adapters, lora.LoraConfig(rank=2, alpha=2.0, targets=("q_proj",)))
  _, other = build(QWEN)
  with pytest.raises(ValueError, match=r"do not fit its kernel"):
    lora.merge(other, adapters, lora.LoraConfig(rank=2, alpha=2.0))


# ----- sharding ------------------------------------------------------------------------------


def test_sharded_adapters_follow_their_kernels():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  config = lora.LoraConfig(rank=4, alpha=8.0)
  key = jax.random.key(0)
  abstract = nnx.eval_shape(lambda: Llama(SMALL, rngs=nnx.Rngs(0)))
  _, abstract_state = nnx.split(abstract)
  base_shardings = nnx.as_pure(sharding.param_shardings(abstract_state, mesh))
  model = sharding.create_sharded_model(lambda: Llama(SMALL, rngs=nnx.Rngs(0)), mesh)
  base = nnx.as_pure(nnx.state(model))

  adapters = lora.create_sharded_lora(nnx.as_pure(abstract_state), config, key, base_shardings)
  attn, mlp = adapters["blocks"][1]["attn"], adapters["blocks"][1]["mlp"]
  expected = {
    "q_proj": (P("fsdp", None), P(None, "tensor", None)),
    "k_proj": (P("fsdp", None), P(None, "tensor", None)),
    "o_proj": (P("tensor", None, None), P(None, "fsdp")),
    "gate_proj": (P("fsdp", None), P(None, "tensor")),
    "down_proj": (P("tensor", None), P(None, "fsdp")),
  }
  for name, (a_spec, b_spec) in expected.items():
    pair = (attn if name.endswith(("q_proj", "k_proj", "o_proj")) else mlp)[name]
    assert pair["a"].sharding.spec == a_spec, name
    assert pair["b"].sharding.spec == b_spec, name
  # The names on nnx.Param adapters give the same layout through finch_jax.sharding, and
  # sharded creation draws the same adapters as creating them on one device.
  named = lora.init_lora(abstract_state, config, key)
  assert named["blocks"][0]["attn"]["o_proj"]["a"].get_metadata()["out_sharding"] == (
    "heads",
    "head_dim",
    None,
  )
  via_names = nnx.as_pure(sharding.param_shardings(named, mesh))
  via_kernels = lora.lora_shardings(adapters, base_shardings)
  jax.tree.map(lambda s, t: s.spec == t.spec or pytest.fail(f"{s} != {t}"), via_names, via_kernels)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
    adapters,
    nnx.as_pure(named),
  )

  # Merging under jit keeps each kernel's layout and gives the unsharded result.
  adapters = jax.device_put(randomize_b(adapters), via_kernels)
  merge = jax.jit(lora.merge, static_argnums=2, out_shardings=base_shardings)
  compiled = merge.lower(base, adapters, config).compile()
  merged = compiled(base, adapters)
  # A @ B comes out in the kernel's layout: the merge needs no communication.
  hlo = compiled.as_text()
  assert not any(op in hlo for op in ("all-gather", "all-reduce", "all-to-all", "collective"))
  reference = lora.merge(jax.tree.map(np.asarray, base), jax.tree.map(np.asarray, adapters), config)
  q = merged["blocks"][0]["attn"]["q_proj"]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (SMALL.d_model // 2, SMALL.num_heads // 2, 24)
  jax.tree.map(
    lambda m, r: np.testing.assert_allclose(m, r, rtol=1e-6, atol=1e-6), merged, reference
  )


def test_docstring_example():
  result = doctest.testmod(finch_jax.lora, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0
