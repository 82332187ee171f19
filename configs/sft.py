"""Supervised fine-tuning of a Hugging Face checkpoint with FINCH, measuring forgetting.

Download a checkpoint (e.g. `huggingface-cli download Qwen/Qwen3-0.6B --local-dir
models/Qwen3-0.6B`), write instruction data as JSONL (one `{"prompt": ..., "response": ...}`
or `{"messages": [{"role": ..., "content": ...}, ...]}` per line), then:

  python train.py --config configs/sft.py --workdir runs/sft \
      --config.base_checkpoint=models/Qwen3-0.6B \
      --config.data.train.name=jsonl:data/train.jsonl \
      --config.data.eval_sets.task.name=jsonl:data/eval.jsonl

The model's architecture and tokenizer come from the checkpoint (config.json, tokenizer.json;
the chat template of tokenizer_config.json formats `messages`); the loss counts response tokens
only. Forgetting is the rise of the loss on a retain set: by default text the base model samples
itself before fine-tuning (`base_samples`), which needs no pretraining data; point
`data.eval_sets.retain` at local text (`local_text:PATH`) or JSONL to measure on your own.
`config.model` below (Qwen3-0.6B's sizes) is used only without a Hugging Face checkpoint; its
dtype, param_dtype and remat apply either way.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """One SFT run from `base_checkpoint`; writes report.json with its forgetting."""
  config = default.get_config()
  config.mode = "finetune"
  config.num_train_steps = 1000
  config.log_every = 10
  config.eval_every = 200
  config.checkpoint_every = 200
  config.data.name = ""
  config.data.train = {"name": "jsonl:data/train.jsonl", "split": "train"}
  config.data.eval_sets = {
    "task": {"name": "jsonl:data/eval.jsonl", "split": "eval"},
    "retain": {"name": "base_samples", "split": "samples"},
  }
  config.data.fact_sets = {}
  config.data.seq_len = 1024
  config.data.batch_size = 32
  config.data.eval_examples = 500
  config.replay.num_samples = 256  # also the size of the base_samples retain set
  config.replay.sample_len = 256
  config.model = dict(
    model_type="qwen3",
    vocab_size=151936,
    d_model=1024,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    d_ff=3072,
    tie_embeddings=True,
    rope_theta=1_000_000.0,
    max_len=40960,
    dtype="bfloat16",
    param_dtype="float32",
    remat=True,
  )
  config.optimizer.learning_rate = 1e-5
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 20
  config.optimizer.final_lr_fraction = 0.1
  config.optimizer.weight_decay = 0.0
  return config
