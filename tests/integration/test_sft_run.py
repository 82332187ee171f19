"""Supervised fine-tuning with FINCH of a tiny imported Hugging Face Qwen3, through train.py.

The model is made here (random weights, saved with `save_hf` beside a byte-level BPE tokenizer
with a ChatML template); the run reads it as any downloaded checkpoint, trains on chat JSONL
with the loss on responses, measures forgetting on the base's own samples, and exports the
fine-tuned model as a Hugging Face directory.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from flax import nnx  # noqa: E402

from finch_jax.models import Llama, LlamaConfig, load_hf, save_hf  # noqa: E402
from finch_jax.models.hf import HFTokenizer  # noqa: E402
from tests.unit.test_sft import CHATML, make_bpe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _chat(i):
  return {
    "messages": [
      {"role": "user", "content": f"What is {i} plus {i}?"},
      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
    ]
  }


def _tokenizer():
  corpus = [json.dumps(_chat(i)) for i in range(50)] + ["user assistant system"]
  return HFTokenizer(
    make_bpe(corpus), eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
  )


@pytest.mark.slow
def test_sft_with_finch_on_an_imported_model_through_train_py(tmp_path):
  tokenizer = _tokenizer()
  config = LlamaConfig(
    vocab_size=((tokenizer.vocab_size + 7) // 8) * 8,
    d_model=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    d_ff=64,
    model_type="qwen3",
    tie_embeddings=True,
    max_len=256,
  )
  base_dir = str(tmp_path / "qwen3-tiny")
  save_hf(Llama(config, rngs=nnx.Rngs(0)), base_dir, tokenizer=tokenizer)
  train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
  train.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(40)))
  held_out.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(40, 50)))
  workdir = str(tmp_path / "run")
  overrides = {
    "base_checkpoint": base_dir,
    "data.train.name": f"jsonl:{train}",
    "data.eval_sets.task.name": f"jsonl:{train}",
    "num_train_steps": 30,
    "log_every": 5,
    "eval_every": 15,
    "checkpoint_every": 15,
    "data.seq_len": 64,
    "data.batch_size": 8,
    "replay.num_samples": 16,
    "replay.sample_len": 32,
    "model.dtype": "float32",
    "model.remat": False,
    "optimizer.learning_rate": 1e-2,
    "optimizer.warmup_steps": 0,
  }
  command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "configs/sft.py"]
  command += ["--workdir", workdir] + [f"--config.{k}={v}" for k, v in overrides.items()]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]

  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  entry = report["methods"]["finch"]
  assert entry["task_loss"] < report["before"]["task_loss"] - 0.5  # it learned the responses
  assert np.isfinite(entry["forgetting"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  scales = [r["finch_scale"] for r in records if "finch_scale" in r]
  assert scales[0] == pytest.approx(1.0, abs=0.2) and max(scales) > 1.0  # FINCH acted
  # The retain set is the base's own samples; the export loads back with the same tokenizer.
  caches = glob.glob(os.path.join(workdir, "base_samples-*.npz"))  # retain (and replay) samples
  assert caches and all(len(np.load(cache).files) == 16 for cache in caches)
  model, exported_tokenizer = load_hf(os.path.join(workdir, "hf"))
  assert model.config == config
  assert exported_tokenizer.chat_template == CHATML
  assert not np.allclose(model.embed[...], Llama(config, rngs=nnx.Rngs(0)).embed[...])


@pytest.mark.slow
def test_smollm2_from_its_gguf_file_fine_tunes_through_train_py(tmp_path, smollm2):
  """The real pretrained SmolLM2-135M-Instruct (a GGUF file) as `base_checkpoint`: a few SFT
  steps with FINCH on chat data lower the task loss, and the export is a Hugging Face model."""
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(40)))
  workdir = str(tmp_path / "run")
  overrides = {
    "base_checkpoint": smollm2,
    "data.train.name": f"jsonl:{train}",
    "data.eval_sets.task.name": f"jsonl:{train}",
    "num_train_steps": 6,
    "log_every": 2,
    "eval_every": 6,
    "checkpoint_every": 6,
    "data.seq_len": 64,
    "data.batch_size": 4,
    "data.eval_examples": 8,
    "replay.num_samples": 4,
    "replay.sample_len": 16,
    "model.dtype": "float32",
    "model.remat": False,
    "optimizer.learning_rate": 1e-4,
    "optimizer.warmup_steps": 0,
  }
  command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "configs/sft.py"]
  command += ["--workdir", workdir] + [f"--config.{k}={v}" for k, v in overrides.items()]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one device: 135M on 2 cores
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  entry = report["methods"]["finch"]
  assert entry["task_loss"] < report["before"]["task_loss"]
  assert np.isfinite(entry["forgetting"])
  model, tokenizer = load_hf(os.path.join(workdir, "hf"))
  assert (model.config.num_layers, model.config.d_model, model.config.vocab_size) == (
    30,
    576,
    49_152,
  )
  assert tokenizer.encode("Paris", add_bos=False, add_eos=False).size >= 1


def test_a_question_answer_split_trains_and_evaluates_on_its_answers(tmp_path):
  """A built split of prompt/response records (the biographies' `task_qa`) is instruction data:
  its batches (training rows, and packed eval rows) weigh the answers and the eos closing each,
  never the questions."""
  from configs import default
  from finch_jax import configure, data, evaluate, inputs

  config = configure.override(
    default.get_config(),
    {
      "data": {
        "options": {"embedded_biographies": {"num_base_people": 4, "num_new_people": 3}},
        "train": {"name": "", "split": "task_qa"},
        "packing": False,
        "batch_size": 4,
        "seq_len": 128,
      }
    },
  )
  questions = data.embedded_corpus("biographies", num_base_people=4, num_new_people=3)["task_qa"]
  answers = {r["response"] for r in questions}
  tokenizer = configure.make_tokenizer(config)
  batch = next(iter(inputs.train_batches(config, str(tmp_path), seed=0)))
  loss_sets = evaluate.Evaluator(config, str(tmp_path), configure.make_trainer(config))
  for batches in (
    [batch],
    loss_sets._loss_batches(config, str(tmp_path), "task", config.data.train, tokenizer, {}),
  ):
    for row in (r for b in batches for r in zip(b["targets"], b["weights"], strict=True)):
      targets, weights = row
      weighted = [int(t) for t, w in zip(targets, weights, strict=True) if w]
      assert weighted and weighted[-1] == tokenizer.eos_id
      ends = [i for i, t in enumerate(weighted) if t == tokenizer.eos_id]
      starts = [0, *(i + 1 for i in ends[:-1])]
      pieces = [tokenizer.decode(weighted[a:b]) for a, b in zip(starts, ends, strict=True)]
      assert set(pieces) <= answers, pieces
