"""Variable types that say which part of a model a weight belongs to.

The split of a model into parts (``ml_ecs.models.params``) is by these types plus the
module path, so a new layer only has to pick the right type for its weights.
"""
from flax import nnx


class Frozen(nnx.Variable):
  """Pretrained backbone weight: shared by all clients of one backbone, never trained by them."""


class SharedLoRA(nnx.Variable):
  """Low-rank adapter weight that is communicated and aggregated (MMA)."""


class ModalityLoRA(SharedLoRA):
  """A shared adapter weight specific to one modality (metadata `modality`): MMA averages it only
  over the clients that have that modality."""


class PrivateLoRA(nnx.Variable):
  """Low-rank adapter weight that never leaves its client."""


class Gate(nnx.Variable):
  """Per-layer mixing gate between the shared and private adapters (private)."""
