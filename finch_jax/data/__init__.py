"""Data for finch_jax: TFDS builders (array_record, no TensorFlow), Grain pipelines, tokenizers.

    from finch_jax import data

    source = data.data_source("embedded/biographies", "finetune", data_dir)
    train = data.lm_dataset(source, tokenizer=data.ByteTokenizer(), seq_len=256,
                            batch_size=32, seed=0, shard_index=jax.process_index(),
                            shard_count=jax.process_count())
    iterator = iter(train)  # iterator.get_state() goes into the checkpoint

See `builders` for dataset names, `pipeline` for the batch format, `sft` for instruction data
(JSONL, loss on responses only), `synthetic` for the embedded corpora, `debian` for real text
and facts from installed Debian packages (`debian/<config>`), `probes` for knowledge probes and
the subset a model recalls.
"""

# Importing `debian` registers its TFDS builder, so `debian/<config>` names a dataset.
from finch_jax.data import debian, probes
from finch_jax.data.builders import (
  EmbeddedCorpus,
  LocalText,
  builder,
  data_source,
  decode_text,
  instruction_records,
  prepare,
)
from finch_jax.data.pipeline import (
  eval_batches,
  evaluation_rows,
  fact_batches,
  lm_batches,
  lm_dataset,
  lm_examples,
  mixture,
  tag_examples,
)
from finch_jax.data.sft import (
  SFTExamples,
  as_sft_examples,
  read_sft,
  sft_batches,
  sft_dataset,
  sft_eval_batches,
  sft_examples,
  tokenize_sft,
)
from finch_jax.data.synthetic import biographies, embedded_corpus, synthetic_language
from finch_jax.data.tokenizer import (
  ByteTokenizer,
  Tokenizer,
  starts_with_bos,
  word_continuations,
)

__all__ = [
  "ByteTokenizer",
  "EmbeddedCorpus",
  "as_sft_examples",
  "LocalText",
  "SFTExamples",
  "Tokenizer",
  "biographies",
  "builder",
  "data_source",
  "debian",
  "decode_text",
  "embedded_corpus",
  "eval_batches",
  "evaluation_rows",
  "fact_batches",
  "instruction_records",
  "lm_batches",
  "lm_dataset",
  "lm_examples",
  "mixture",
  "prepare",
  "probes",
  "read_sft",
  "sft_batches",
  "sft_dataset",
  "sft_eval_batches",
  "sft_examples",
  "tag_examples",
  "tokenize_sft",
  "synthetic_language",
  "starts_with_bos",
  "word_continuations",
]
