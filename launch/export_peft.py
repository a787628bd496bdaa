"""Exports one node of a run (a workdir of launch/train.py) as a Hugging Face PEFT LoRA adapter.

  python launch/export_peft.py --workdir=/tmp/ml_ecs --client=3 --out=/tmp/peft_client3
  python launch/export_peft.py --workdir=/tmp/ml_ecs --client=3 --which=shared --out=/tmp/peft_global
  python launch/export_peft.py --workdir=/tmp/ml_ecs --server --out=/tmp/peft_server

--which=personalised: the client's exact LM (shared + private LoRA through its gates, rank
2r); --which=shared: the aggregated, communicated LoRA alone (rank r). With our own
pretrained backbone the base model is written to OUT/base_model; with a Hugging Face
backbone, adapter_config.json names the checkpoint. Load in PyTorch with
`PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), OUT)`.
"""
import sys

import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

from absl import app, flags

from ml_ecs.backbones import peft_io
from ml_ecs.run.export import export_peft_from_workdir
from ml_ecs.config.validation import ConfigError

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a run (config.json + checkpoints/).')
_CLIENT = flags.DEFINE_integer('client', None, 'Client id to export (see clients.json).')
_SERVER = flags.DEFINE_boolean('server', False, 'Export the server instead of a client.')
_WHICH = flags.DEFINE_enum('which', 'personalised', list(peft_io.WHICH), 'Which LoRA to export.')
_OUT = flags.DEFINE_string('out', None, 'Output directory of the adapter.')
_STEP = flags.DEFINE_integer('round', None, 'Checkpoint round (default: the newest).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  try:
    info = export_peft_from_workdir(_WORKDIR.value, _OUT.value, client=_CLIENT.value, server=_SERVER.value,
                                    which=_WHICH.value, step=_STEP.value, log=print)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f"wrote the {info['which']} LoRA of {info['node']} (round {info['round']}) to {info['adapter']}; "
        f"base model: {info['base_model']}")
  return 0


if __name__ == '__main__':
  app.run(main)
