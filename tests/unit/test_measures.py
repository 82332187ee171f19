"""The further measures of what fine-tuning changed: token accuracy, KL to the base, calibration."""

import jax.numpy as jnp
import numpy as np
import pytest

from finch_jax import configure, data, evaluate, measures
from finch_jax.measures import expected_calibration_error
from tests.integration.test_trainer import small_config


def test_expected_calibration_error_by_hand():
  # Bin sums [facts, summed confidence, facts right] over 10 bins: 2 facts at confidence 0.95,
  # one right (accuracy 0.5, gap 0.45), and 2 at 0.25, both right (gap 0.75).
  sums = np.zeros((3, 10))
  sums[:, 9] = [2, 1.9, 1]
  sums[:, 2] = [2, 0.5, 2]
  assert expected_calibration_error(sums) == pytest.approx(0.5 * 0.45 + 0.5 * 0.75)
  assert np.isnan(expected_calibration_error(np.zeros((3, 10))))


def test_evaluator_measures_accuracy_kl_and_calibration(tmp_path):
  config = small_config(
    **{
      "data.token_accuracy": True,
      "data.kl_sets": ("retain",),
      "data.calibration_sets": ("task", "retain"),
    }
  )
  trainer = configure.make_trainer(config)
  base = trainer.init_params(0)
  evaluator = evaluate.Evaluator(config, str(tmp_path), trainer, base=base)
  at_base = evaluator(base)
  assert at_base["retain_kl"] == pytest.approx(0.0, abs=1e-6)  # the base against itself
  assert "task_kl" not in at_base
  for key in ("task_accuracy", "retain_accuracy", "task_ece", "retain_ece", "retain_fact_accuracy"):
    assert 0.0 <= at_base[key] <= 1.0, key
  # The reliability diagram's bins hold every probe, and give the same ECE.
  bins = np.asarray(at_base["retain_calibration"])
  assert bins.shape == (3, measures.CALIBRATION_BINS)
  assert expected_calibration_error(bins) == pytest.approx(at_base["retain_ece"])
  diagram = measures.reliability(bins)
  assert sum(diagram["share"]) == pytest.approx(1.0)
  # The plain loss and the measured one agree.
  plain = trainer.evaluate(base, evaluator.loss_sets["retain"])
  assert at_base["retain_loss"] == pytest.approx(plain)
  other = evaluator(trainer.init_params(1))
  assert other["retain_kl"] > 0.01  # another model predicts otherwise


# ----- each measure weighs what it says -------------------------------------------------------


class _NoBosBytes(data.ByteTokenizer):
  """The byte tokenizer of a model whose text format has no bos (as SmolLM2-Instruct's)."""

  adds_bos = False


def _weights(tokenizer, texts):
  batches = data.eval_batches(texts, tokenizer=tokenizer, seq_len=16, batch_size=len(texts))
  return [(b["targets"], b["weights"]) for b in batches]


def test_text_evaluation_weighs_only_the_texts_own_tokens():
  # [bos, h, i, eos]: targets h, i, eos; the added eos weighs nothing (it weighed 1 before).
  [(targets, weights)] = _weights(data.ByteTokenizer(), ["hi"])
  assert weights.sum() == 2
  assert set(targets[weights > 0].tolist()) == {ord("h") + 3, ord("i") + 3}
  # Without a bos in the model's format the first token is context only: "hi" weighs just "i".
  [(targets, weights)] = _weights(_NoBosBytes(), ["hi"])
  assert weights.sum() == 1
  assert targets[weights > 0].tolist() == [ord("i") + 3]


def test_smollm2s_text_format_has_no_bos(smollm2_tokenizer):
  # The file says tokenizer.ggml.add_bos_token = false: its bos is the chat token <|im_start|>.
  assert data.starts_with_bos(smollm2_tokenizer) is False
  assert data.starts_with_bos(data.ByteTokenizer()) is True


def test_evaluation_subsets_are_drawn_over_the_whole_source():
  rows = data.evaluation_rows(1000, 40)
  assert len(rows) == 40 and list(rows) == sorted(rows)
  assert rows.min() < 100 and rows.max() > 900  # spread over the source, not the first 40
  # Uniform: about a quarter of 1,000 draws out of 10,000 in each quarter (binomial sd 14).
  quarters = np.bincount(data.evaluation_rows(10_000, 1000) // 2500)
  assert np.all(np.abs(quarters - 250) < 50), quarters
  np.testing.assert_array_equal(rows, data.evaluation_rows(1000, 40))  # stable
  np.testing.assert_array_equal(data.evaluation_rows(30, 40), np.arange(30))
  texts = [f"text {i}" for i in range(1000)]
  batches = data.eval_batches(
    texts, tokenizer=data.ByteTokenizer(), seq_len=16, batch_size=8, num_examples=40
  )
  firsts = [row for b in batches for row in b["inputs"] if row[0] == 1]
  decoded = sorted(data.ByteTokenizer().decode(row) for row in firsts)
  assert decoded == sorted(texts[i] for i in rows)


def _one_hot_logits(predicted, vocab=12):
  return jnp.asarray(np.eye(vocab, dtype=np.float32)[np.asarray(predicted)] * 10.0)


def test_token_accuracy_leaves_end_markers_out_and_exact_match_needs_every_token():
  eos = 2
  # One row, two answers packed: segment 1 targets [5, 6, eos], all predicted; segment 2
  # targets [7, 8, eos], where 8 is missed but eos is predicted.
  batch = {
    "targets": jnp.asarray([[5, 6, eos, 7, 8, eos]]),
    "weights": jnp.ones((1, 6)),
    "segment_ids": jnp.asarray([[1, 1, 1, 2, 2, 2]]),
  }
  logits = _one_hot_logits([[5, 6, eos, 7, 9, eos]])
  sums = measures.token_sums(logits, batch, jnp.asarray([eos]))
  assert sums["right"] / sums["scored"] == pytest.approx(3 / 4)  # 3 of 4 answer tokens
  assert sums["answers_right"] == 1 and sums["answers"] == 2
  # An answer right in every token but not stopping is not exact either.
  sums = measures.token_sums(_one_hot_logits([[5, 6, 4, 7, 8, eos]]), batch, jnp.asarray([eos]))
  assert sums["right"] / sums["scored"] == pytest.approx(1.0)
  assert sums["answers_right"] == 1


def test_a_fact_is_recalled_only_when_its_answer_ends_there():
  # Byte tokenizer: prompt "n=", answer " 2"; the model writes " 2" and then "6" (" 26") or ".".
  tok = data.ByteTokenizer()
  [batch] = list(
    data.fact_batches(
      [{"prompt": "n=", "answer": " 2"}],
      tokenizer=tok,
      max_prompt_len=4,
      answer_len=3,
      batch_size=1,
    )
  )
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  continues = jnp.asarray(data.word_continuations(tok, tok.vocab_size))
  tokens, _ = measures.fact_inputs(batch)
  n = int(batch["prompt_lengths"][0])  # bos, "n", "="

  def verdict(after: str) -> bool:
    predicted = np.zeros(tokens.shape[1], np.int64)
    predicted[n - 1 : n + 1] = tok.encode(" 2", add_bos=False, add_eos=False)
    predicted[n + 1] = tok.encode(after, add_bos=False, add_eos=False)[0]
    logits = jnp.asarray(np.eye(tok.vocab_size, dtype=np.float32)[predicted][None] * 10.0)
    return bool(measures.recalled_rows(logits, batch, continues)[0])

  assert not verdict("6")  # " 26" is not " 2"
  assert verdict(".")
  assert verdict(" ")


def test_fact_sums_answer_nll_by_hand():
  tok = data.ByteTokenizer()
  [batch] = list(
    data.fact_batches(
      [{"prompt": "a", "answer": "bc"}],
      tokenizer=tok,
      max_prompt_len=2,
      answer_len=2,
      batch_size=2,
    )
  )
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  tokens, _ = measures.fact_inputs(batch)
  logits = jnp.zeros((2, tokens.shape[1], tok.vocab_size))  # uniform: NLL log(V) per token
  sums = measures.fact_sums(logits, batch, jnp.zeros(tok.vocab_size, bool))
  assert float(sums["answer_tokens"]) == 2  # the padding row counts nothing
  assert float(sums["answer_nll"]) == pytest.approx(2 * np.log(tok.vocab_size), rel=1e-5)
  assert float(sums["facts"]) == 1
  # Uniform first-token confidence 1/V in bin 0, wrong (arg-max is token 0): ECE = 1/V.
  assert measures.expected_calibration_error(sums["calibration"]) == pytest.approx(
    1 / tok.vocab_size, rel=1e-5
  )
  diagram = measures.reliability(sums["calibration"])
  assert diagram["share"] == [1.0] and diagram["accuracy"] == [0.0]
