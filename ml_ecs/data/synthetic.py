"""Generator of the embedded default dataset: a documented latent model of
human activity seen by three complementary sensors.

Latent model. Each of the six activities is a combination of three latent
factors: motion energy e in {0, 1, 2}, body height h in {0, 1, 2} and an impact
flag i in {0, 1}:

  ============  ===  ===  ===
  activity       e    h    i
  ============  ===  ===  ===
  standing       0    2    0
  sitting        0    1    0
  lying          0    0    0
  walking        1    2    0
  running        2    2    0
  falling        2    1    1
  ============  ===  ===  ===

A recording (sequence) has one activity and one subject; the subject draws
per-recording nuisance variables (sensor orientation, gait scale, camera
offset). Each window of a recording is one sample, observed by three sensors
that each see only part of the factors, so they are complementary:

* ``accel`` [32, 3], a wrist accelerometer time series: an oscillation whose
  frequency and amplitude grow with e, projected on a random sensor
  orientation, plus gravity, plus a decaying spike when i = 1, plus noise.
  It sees e and i, not h (standing, sitting and lying look alike).
* ``depth`` [8], depth-camera silhouette features: a fixed linear map of
  (h, 0.15 e) plus a subject offset and noise. It sees h (and a trace of e),
  so standing, walking and running look alike.
* ``image`` [8, 8], a low-resolution RGB-free silhouette image: a Gaussian
  blob whose vertical position and extent follow h and whose horizontal smear
  follows e, under heavy pixel noise: both factors, coarsely.

``tests/unit/test_data.py`` checks the complementarity: a classifier on all three
modalities beats the same classifier on any single one.
"""
from __future__ import annotations

import numpy as np

from ml_ecs.data.dataset import MultimodalDataset

CLASS_NAMES = ('standing', 'sitting', 'lying', 'walking', 'running', 'falling')
# (energy, height, impact) per class, see the module docstring.
FACTORS = np.array([[0, 2, 0], [0, 1, 0], [0, 0, 0], [1, 2, 0], [2, 2, 0], [2, 1, 1]], np.float32)
DESCRIPTIONS = (
    ('the person is standing still', 'a person stands upright without moving',
     'someone is standing in place', 'the subject stands quietly'),
    ('the person is sitting down', 'a person sits still on a chair',
     'someone is seated and not moving', 'the subject is sitting quietly'),
    ('the person is lying on the floor', 'a person lies down without moving',
     'someone is lying flat on the ground', 'the subject lies still'),
    ('the person is walking', 'a person walks at a steady pace',
     'someone is walking around', 'the subject walks slowly'),
    ('the person is running', 'a person runs quickly',
     'someone is running fast', 'the subject is jogging at speed'),
    ('the person is falling down', 'a person falls to the ground',
     'someone has a sudden fall', 'the subject falls over'),
)
ACCEL_STEPS = 32
IMAGE_SIZE = 8
DEPTH_DIM = 8


def _accel(rng, e, impact, n):
  t = np.arange(ACCEL_STEPS, dtype=np.float32) / ACCEL_STEPS
  freq = 1.0 + 2.0 * e + rng.normal(0, 0.2, n)
  amp = (0.15 + 0.6 * e) * rng.normal(1.0, 0.15, n)
  phase = rng.uniform(0, 2 * np.pi, n)
  wave = amp[:, None] * np.sin(2 * np.pi * freq[:, None] * t[None] + phase[:, None])
  orient = rng.normal(size=(n, 3))
  orient /= np.linalg.norm(orient, axis=1, keepdims=True)
  x = wave[:, :, None] * orient[:, None, :]
  x[:, :, 2] += 1.0  # gravity
  pos = rng.integers(4, ACCEL_STEPS - 4, n)
  decay = np.exp(-np.maximum(np.arange(ACCEL_STEPS)[None] - pos[:, None], 0) / 1.5)
  decay *= np.arange(ACCEL_STEPS)[None] >= pos[:, None]
  spike_dir = rng.normal(size=(n, 3))
  x += (2.5 * impact)[:, None, None] * decay[:, :, None] * spike_dir[:, None, :]
  return x + rng.normal(0, 0.25, x.shape)


def _depth(rng, e, h, subject_offset):
  mix = np.random.default_rng(1234).normal(size=(2, DEPTH_DIM))  # fixed sensor map
  latent = np.stack([h - 1.0, 0.15 * (e - 1.0)], axis=1)
  return latent @ mix + subject_offset + rng.normal(0, 0.35, (len(h), DEPTH_DIM))


def _image(rng, e, h, cam_offset):
  n = len(h)
  rows = np.arange(IMAGE_SIZE, dtype=np.float32)[None, :, None]
  cols = np.arange(IMAGE_SIZE, dtype=np.float32)[None, None, :]
  center_r = (5.5 - 1.5 * h + cam_offset[:, 0] + rng.normal(0, 0.4, n))[:, None, None]
  center_c = (3.5 + cam_offset[:, 1] + rng.normal(0, 0.4, n))[:, None, None]
  sig_r = (0.8 + 0.6 * h)[:, None, None]
  sig_c = (0.7 + 0.5 * e)[:, None, None]
  blob = np.exp(-0.5 * ((rows - center_r) / sig_r) ** 2 - 0.5 * ((cols - center_c) / sig_c) ** 2)
  return blob + rng.normal(0, 0.35, (n, IMAGE_SIZE, IMAGE_SIZE))


def generate(num_sequences: int = 300, windows_per_sequence: int = 10, seed: int = 0) -> MultimodalDataset:
  """Draws the dataset of the latent model above (balanced classes)."""
  rng = np.random.default_rng(seed)
  seq_labels = np.arange(num_sequences) % len(CLASS_NAMES)
  rng.shuffle(seq_labels)
  labels = np.repeat(seq_labels, windows_per_sequence).astype(np.int32)
  seq_ids = np.repeat(np.arange(num_sequences), windows_per_sequence).astype(np.int64)
  n = len(labels)
  e, h, impact = (FACTORS[labels, k] for k in range(3))
  subj_depth = np.repeat(rng.normal(0, 0.3, (num_sequences, DEPTH_DIM)), windows_per_sequence, 0)
  cam = np.repeat(rng.normal(0, 0.5, (num_sequences, 2)), windows_per_sequence, 0)
  modalities = {
      'accel': _accel(rng, e, impact, n).astype(np.float32),
      'depth': _depth(rng, e, h, subj_depth).astype(np.float32),
      'image': _image(rng, e, h, cam).astype(np.float32),
  }
  text_ids = rng.integers(0, len(DESCRIPTIONS[0]), n).astype(np.int32)
  return MultimodalDataset(modalities, labels, seq_ids, CLASS_NAMES, DESCRIPTIONS, text_ids)


def generate_chunked(num_sequences: int, windows_per_sequence: int = 10, seed: int = 0,
                     chunk_sequences: int = 2048) -> MultimodalDataset:
  """The latent model above at any size: `num_sequences` recordings drawn in chunks of
  `chunk_sequences` (chunk j from the stream (seed, j), balanced classes per chunk), written
  into preallocated float32 arrays, so the host holds the dataset once plus one chunk's
  float64 temporaries. Deterministic in (num_sequences, windows_per_sequence, seed, chunk_sequences)."""
  if num_sequences < 1 or windows_per_sequence < 1 or chunk_sequences < 1:
    raise ValueError('generate_chunked needs num_sequences, windows_per_sequence, chunk_sequences >= 1')
  n = num_sequences * windows_per_sequence
  modalities = {'accel': np.empty((n, ACCEL_STEPS, 3), np.float32), 'depth': np.empty((n, DEPTH_DIM), np.float32),
                'image': np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)}
  labels, seq_ids, text_ids = np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, np.int32)
  for j, s0 in enumerate(range(0, num_sequences, chunk_sequences)):
    s1 = min(s0 + chunk_sequences, num_sequences)
    part = generate(s1 - s0, windows_per_sequence, seed=int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))
    a, b = s0 * windows_per_sequence, s1 * windows_per_sequence
    for k, x in part.modalities.items():
      modalities[k][a:b] = x
    labels[a:b], seq_ids[a:b], text_ids[a:b] = part.labels, part.sequence_ids + s0, part.text_ids
  return MultimodalDataset(modalities, labels, seq_ids, CLASS_NAMES, DESCRIPTIONS, text_ids)


def recordings_for(num_clients: int, public_fraction: float, max_public: int = 0) -> int:
  """Recordings that give `num_clients` clients about three private recordings each (at least 300);
  with the public split capped at `max_public` recordings, only that many more."""
  if max_public:
    return max(300, 3 * num_clients + max_public)
  return max(300, int(np.ceil(3 * num_clients / max(1.0 - public_fraction, 0.05))))
