"""What an evaluation counts, as sums over one batch: pure functions of logits and arrays.

Every measure is a sum that adds up over batches (and over devices, under `jit` with sharded
arrays), as in Flax's examples: the `Evaluator` adds each set's sums and divides once at the
end, so a mean over a set is exact whatever its batching.

Text and instruction data (`token_sums`, batches of `finch_jax.data.pipeline`):

    loss, tokens      weighted cross-entropy and the weight it is summed over
    right, scored     arg-max hits over the weighted targets that are not end markers (the eos
                      or end-of-turn token closing an answer), and how many such targets: token
                      accuracy counts the answer's own tokens, not its stop
    answers_right,    examples (segments of a row) every weighted target of which the arg-max
    answers           predicts, end marker included, and examples counted: greedy decoding
                      reproduces the whole answer and stops where it should (exact match)
    kl                KL(reference || model) summed with the weights (`token_kl`)

Fact probes (`fact_sums`, batches of `pipeline.fact_batches`):

    recalled, facts   probes whose answer greedy decoding writes exactly, and then ends: the
                      token after it must not continue the answer's last word, so " 2" does not
                      pass for " 26" (`word_continuations`)
    answer_nll,       the answer tokens' summed negative log-likelihood (teacher forced) and
    answer_tokens     their count: forgetting shows in confidence before it shows in recall
    calibration       [3, CALIBRATION_BINS]: per confidence bin of the first answer token,
                      (probes, summed confidence, probes whose first token is right)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from finch_jax import losses

CALIBRATION_BINS = 10  # equal-width confidence bins of the expected calibration error


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """(sum of weighted token cross-entropies, sum of weights), both float32 scalars, from whole
  logits (`finch_jax.losses` makes them from hidden states, a chunk at a time)."""
  per_token = losses.per_token_cross_entropy(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_token * weights), jnp.sum(weights)


def token_kl(logits: jax.Array, reference_logits: jax.Array, weights: jax.Array):
  """(sum over weighted tokens of KL(reference || model), sum of weights), float32 scalars.

  KL(p_ref || p_model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v)) at each position: zero
  where the model predicts exactly what the reference did. No gradient flows into the
  reference's logits."""
  reference_logits = jax.lax.stop_gradient(reference_logits).astype(jnp.float32)
  per_token = losses.per_token_kl(logits.astype(jnp.float32), reference_logits)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_token * weights), jnp.sum(weights)


def _per_segment(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """[B, L] values summed per (row, segment): [B, L + 1], column k for segment k (0: padding)."""
  rows = jnp.arange(values.shape[0])[:, None]
  out = jnp.zeros((values.shape[0], values.shape[1] + 1), jnp.float32)
  return out.at[rows, segment_ids].add(values.astype(jnp.float32))


def token_sums(
  logits: jax.Array,
  batch: dict[str, jax.Array],
  end_ids: jax.Array,
  reference_logits: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """The sums of a text or instruction batch (see the module docstring).

  Args:
    logits: the model's logits [B, L, vocab] for `batch["inputs"]`.
    batch: `targets`, `weights` and `segment_ids` [B, L].
    end_ids: int32 [k], the ids that close an answer (eos, end of turn), left out of `right`.
    reference_logits: a reference model's logits for the KL; None gives `kl` 0.
  """
  targets, weights = batch["targets"], batch["weights"].astype(jnp.float32)
  loss, tokens = token_cross_entropy(logits, targets, weights)
  hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  scored = weights * (~jnp.isin(targets, end_ids)).astype(jnp.float32)
  weighted = (weights > 0).astype(jnp.float32)
  misses = _per_segment(weighted * (1.0 - hit), batch["segment_ids"])[:, 1:]
  counted = _per_segment(weighted, batch["segment_ids"])[:, 1:] > 0
  kl = jnp.zeros([], jnp.float32)
  if reference_logits is not None:
    kl, _ = token_kl(logits, reference_logits, weights)
  return {
    "loss": loss,
    "tokens": tokens,
    "right": jnp.sum(hit * scored),
    "scored": jnp.sum(scored),
    "answers_right": jnp.sum(counted & (misses == 0)).astype(jnp.float32),
    "answers": jnp.sum(counted).astype(jnp.float32),
    "kl": kl,
  }


def fact_inputs(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(tokens [B, P + A]: each prompt followed by its answer, answer positions [B, A]).

  The model run on these tokens predicts each answer token from the prompt and the answer so
  far (teacher forcing): greedy decoding writes the answer exactly if and only if the arg-max
  is right at every answer position, so one forward pass gives the verdict of decoding."""
  prompts, lengths, answers = batch["prompts"], batch["prompt_lengths"], batch["answers"]
  batch_size, answer_len = answers.shape
  rows = jnp.arange(batch_size)[:, None]
  answer_pos = lengths[:, None] + jnp.arange(answer_len)
  tokens = jnp.pad(prompts, ((0, 0), (0, answer_len))).at[rows, answer_pos].set(answers)
  return tokens, answer_pos


def recalled_rows(
  logits: jax.Array, batch: dict[str, jax.Array], continues: jax.Array
) -> jax.Array:
  """bool [B]: greedy decoding after each prompt writes its answer exactly and then ends it.

  Args:
    logits: the model's logits for `fact_inputs(batch)[0]`.
    batch: a `fact_batches` batch.
    continues: bool [vocab]: whether a token continues the word before it
      (`finch_jax.data.tokenizer.word_continuations`); the token predicted after the answer
      must not.
  """
  _, answer_pos = fact_inputs(batch)
  rows = jnp.arange(answer_pos.shape[0])
  predicted = jnp.argmax(logits[rows[:, None], answer_pos - 1], axis=-1)
  mask = batch["answer_mask"] > 0
  exact = jnp.all((predicted == batch["answers"]) | ~mask, axis=1)
  last = batch["prompt_lengths"] + jnp.sum(mask, axis=1).astype(jnp.int32) - 1
  after = jnp.argmax(logits[rows, last], axis=-1)
  # Ids past the table (an embedding padded beyond the tokenizer's vocabulary) continue nothing.
  vocab = logits.shape[-1]
  continues = jnp.pad(continues, (0, max(0, vocab - continues.shape[0])))[:vocab]
  return exact & ~continues[after]


def fact_sums(
  logits: jax.Array, batch: dict[str, jax.Array], continues: jax.Array
) -> dict[str, jax.Array]:
  """The sums of a fact-probe batch (see the module docstring); `logits` are the model's for
  `fact_inputs(batch)[0]`, `continues` as for `recalled_rows`."""
  _, answer_pos = fact_inputs(batch)
  rows = jnp.arange(answer_pos.shape[0])
  counted = (batch["example_mask"] > 0).astype(jnp.float32)
  recalled = recalled_rows(logits, batch, continues).astype(jnp.float32) * counted
  log_probs = jax.nn.log_softmax(logits[rows[:, None], answer_pos - 1].astype(jnp.float32), -1)
  answer_log_probs = jnp.take_along_axis(log_probs, batch["answers"][..., None], axis=-1)[..., 0]
  answer_weights = batch["answer_mask"].astype(jnp.float32) * counted[:, None]
  first = jnp.exp(log_probs[:, 0])  # the next-token distribution right after the prompt
  confidence = jnp.max(first, axis=-1)
  right = (jnp.argmax(first, axis=-1) == batch["answers"][:, 0]).astype(jnp.float32)
  bins = jnp.minimum((confidence * CALIBRATION_BINS).astype(jnp.int32), CALIBRATION_BINS - 1)
  one_hot = jax.nn.one_hot(bins, CALIBRATION_BINS) * counted[:, None]
  return {
    "recalled": jnp.sum(recalled),
    "facts": jnp.sum(counted),
    "answer_nll": -jnp.sum(answer_log_probs * answer_weights),
    "answer_tokens": jnp.sum(answer_weights),
    "calibration": jnp.stack([one_hot.sum(0), confidence @ one_hot, right @ one_hot]),
  }


def expected_calibration_error(bin_sums: np.ndarray) -> float:
  """Expected calibration error from `fact_sums`' `calibration`: the mean over bins of
  |accuracy - confidence| in the bin, weighted by the share of probes in it (NaN without
  probes). Above 0 either way: over-confident where confidence exceeds accuracy, under- where
  it falls short (`reliability` tells which)."""
  count, confidence, right = np.asarray(bin_sums, np.float64)
  if count.sum() == 0:
    return float("nan")
  filled = count > 0
  gap = np.abs(right[filled] - confidence[filled]) / count[filled]
  return float(np.sum(count[filled] / count.sum() * gap))


def reliability(bin_sums: np.ndarray) -> dict[str, list[float]]:
  """The reliability diagram of `fact_sums`' `calibration`: per bin with probes, its lower
  edge, the share of probes in it, their mean confidence and their accuracy."""
  count, confidence, right = np.asarray(bin_sums, np.float64)
  filled = count > 0
  return {
    "bin_start": (np.arange(CALIBRATION_BINS)[filled] / CALIBRATION_BINS).tolist(),
    "share": (count[filled] / max(count.sum(), 1.0)).tolist(),
    "confidence": (confidence[filled] / count[filled]).tolist(),
    "accuracy": (right[filled] / count[filled]).tolist(),
  }


__all__ = [
  "CALIBRATION_BINS",
  "expected_calibration_error",
  "fact_inputs",
  "fact_sums",
  "recalled_rows",
  "reliability",
  "token_cross_entropy",
  "token_kl",
  "token_sums",
]
