"""A realistic-size pair: edge clients on distilgpt2 (82M), the server on gpt2-medium (355M).

Both are Hugging Face GPT-2-family checkpoints (one tokenizer, 50,257 tokens), read with
`ml_ecs.backbones.hf_gpt2` (`pip install 'ml-ecs[hf]'`); their config.json decides the
architecture (ml_ecs/backbones/resolve.py), so the width/layers/heads fields below are not used.
LoRA r=8, alpha 16 on the GPT-2 attention projections (c_attn, c_proj), as in PEFT's
usual GPT-2 setup. Needs the checkpoints: a hub connection, the Hugging Face cache, or
local directories (--config.edge_model.backbone.hf=/path/to/distilgpt2 ...).

Without checkpoints:      --config.edge_model.backbone.hf=random:distilgpt2 (and random:gpt2-medium) builds the
                          same architectures with random weights (timing and memory only; docs/own_data.md)
Size it without weights:  python -m ml_ecs.run.sizing --config=configs/gpt2_pair.py
Train:                    python launch/train.py --config=configs/gpt2_pair.py --workdir=DIR
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.edge_model = default.model(default.backbone(width=768, layers=6, heads=12, max_len=1024, hf='distilgpt2'),
                               encoder_width=64)
  c.server_model = default.model(default.backbone(width=1024, layers=24, heads=16, max_len=1024,
                                                  hf='gpt2-medium'), encoder_width=128)
  for m in (c.edge_model, c.server_model):
    m.backbone.update(dict(lora_rank=8, lora_alpha=16.0, lora_targets=('qkv', 'attn_out')))
    m.update(dict(d_enc=64, d_fuse=128, d_z=64, prompt_len=8))
  # GPT-2's BPE: the instruction is 5 tokens, the answers at most ~10 (init checks and says).
  c.text.update(dict(instr_len=8, answer_len=16))
  c.pretrain.steps = 0    # unused: both backbones are pretrained checkpoints
  c.train.batch_size = 8
  return c
