"""A ~1B-parameter FINCH fine-tune for a TPU v5p pod slice or one 8-GPU node.

Every host runs the same command; JAX reads the pod's (or SLURM's / Kubernetes') environment:

  python train.py --config configs/large_pod.py --workdir gs://BUCKET/run \
      --config.base_checkpoint=gs://BUCKET/base --config.data.name=local_text:/data/corpus

Choices, and why:
- FSDP over every device (mesh.fsdp=-1): parameters, gradients and Adam's moments are split
  across chips, so a 1B model (about 16 GB of float32 state with Adam) costs each of 32 chips
  about 0.5 GB; the batch is split over the same axis. Tensor parallelism stays 1: at this width
  the all-reduces it adds cost more than they save. On one 8-GPU node set mesh.fsdp=8.
- bfloat16 compute with float32 parameters and optimizer state (model.dtype / param_dtype).
- remat=True: each block's activations are recomputed in the backward pass, trading about a
  third more compute for activation memory that no longer grows with depth.
- 256 rows x 2048 tokens per step (about 0.5M tokens), 8 rows per chip on 32 chips; raise
  grad_accum_steps when fewer chips hold the batch. FINCH sees the mean loss of the whole
  accumulated batch.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The pod-scale fine-tuning config."""
  config = default.get_config()
  config.mode = "finetune"
  config.num_train_steps = 5000
  config.log_every = 20
  config.eval_every = 500
  config.checkpoint_every = 500
  config.data.seq_len = 2048
  config.data.batch_size = 256
  config.data.eval_examples = 2000
  config.model = dict(
    vocab_size=264,  # byte-level tokenizer, padded to a multiple of 8
    max_len=2048,
    num_layers=20,
    d_model=2048,
    num_heads=16,
    num_kv_heads=8,
    d_ff=5632,
    tie_embeddings=True,
    init="scaled",  # the compact model's depth-scaled init (this pretrains from scratch)
    rope_theta=500_000.0,
    dtype="bfloat16",
    param_dtype="float32",
    remat=True,
    scan_layers=True,  # one block compiled and scanned 20 times
  )
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  config.optimizer.learning_rate = 3e-5
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.final_lr_fraction = 0.1
  config.optimizer.weight_decay = 0.1
  return config
