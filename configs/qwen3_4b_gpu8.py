"""A FINCH fine-tune of Qwen3-4B on one node of 8 NVIDIA H100 80GB GPUs (one process).

One process drives all 8 GPUs (docs/pod.md):

  huggingface-cli download Qwen/Qwen3-4B --local-dir /path/to/Qwen3-4B
  python train.py --config configs/qwen3_4b_gpu8.py --workdir /data/runs/qwen3-4b-finch \
      --config.base_checkpoint=/path/to/Qwen3-4B \
      --config.data.train.name=jsonl:/path/train.jsonl \
      --config.data.eval_sets.task.name=jsonl:/path/eval.jsonl \
      --config.data.eval_sets.retain.name=local_text:/path/retain_text \
      --config.data.eval_sets.retain.split=validation

The model, data, batch and optimizer are those of `configs/qwen3_4b_tpu_v5p.py` (see its
docstring for the shared reasoning: float32 parameters and Adam moments with bfloat16 compute,
remat, 64 rows x 4096 tokens per step, AdamW at 1e-5 with cosine decay, FINCH's defaults), so
a run on either machine follows the same recipe. What differs is the machine:

- 8 GPUs, 80 GB each (79.6 GiB as CUDA counts it). JAX preallocates 75% of it by default
  (XLA_PYTHON_CLIENT_MEM_FRACTION=.75), so the budget checked is 59.7 GiB per GPU.
- Mesh: tensor parallelism over 4 GPUs (heads, KV heads, MLP and the 151,936-entry vocabulary),
  times 2 data-parallel groups. NVLink carries the per-layer activation all-reduces of tensor
  parallelism at 900 GB/s, so within one node it costs little; tensor=4 rather than 8 halves
  that traffic per GPU (each group handles half the rows) and still leaves the parameters,
  gradients and Adam moments 4-way split: 16 B x 4.02e9 / 4 = 16.1 GB per GPU (12.1 GB of it
  between steps). FSDP would split them 8 ways: while the loss made the whole logits its
  temporaries measured far beyond any GPU's memory; with the chunked loss, mesh.fsdp=8 measures
  20.7 GiB per GPU on XLA:CPU (1 row per GPU per micro-batch, every layer's weights gathered
  for it), an option this config has not been tuned for.
- Batch: 64 rows per step as on the TPU slice, in 8 micro-batches of 8 rows
  (grad_accum_steps=8): 4 rows per data-parallel group at a time, 16,384 tokens per matmul.
  Measured by `python benchmarks/pod_memory.py` (docs/pod.md): 28.8 GiB per GPU compiled by
  XLA:CPU, 48% of the 59.7 GiB budget (32.1 GiB before the chunked loss, the attention kernels
  and the scanned layers the TPU config sets). With the whole logits and the einsum attention,
  the TPU config's 8 rows per group (grad_accum_steps=4) measured 43.6 GiB, 73%: too close to
  the limit for a figure no GPU compiler produced (the CUDA context, cuBLAS and NCCL workspaces
  come on top).
"""

import ml_collections

from configs import qwen3_4b_tpu_v5p

# The machine this config is written for; benchmarks/pod_memory.py and the tests read it.
TARGET = {
  "name": "8 x H100 80GB",  # One node, NVLink between the GPUs.
  "devices": 8,  # JAX devices: one per GPU.
  "processes": 1,  # One process drives all 8 GPUs.
  "hbm_gib": 79.6,  # HBM per GPU as CUDA reports it (81,559 MiB).
  "usable_fraction": 0.75,  # JAX's default preallocation (XLA_PYTHON_CLIENT_MEM_FRACTION).
}


def get_config() -> ml_collections.ConfigDict:
  """Qwen3-4B fine-tuning with FINCH on one 8 x H100 node: the TPU slice's recipe and batch."""
  config = qwen3_4b_tpu_v5p.get_config()
  config.grad_accum_steps = 8  # 8 micro-batches of 8 rows: 4 rows per data-parallel group.
  config.mesh.data = -1  # 2 data-parallel groups on 8 GPUs
  config.mesh.fsdp = 1  # see the docstring: FSDP's temporaries measured beyond any GPU's HBM
  config.mesh.tensor = 4  # heads, MLP and vocabulary over 4 GPUs (NVLink)
  return config
