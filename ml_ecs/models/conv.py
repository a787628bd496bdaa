"""Convolution as one matrix product over stacked shifted windows (im2col), a drop-in for
`jax.lax.conv_general_dilated` on channels-last inputs.

Why not only XLA's convolution: inside a cohort every client has its own kernel, so `vmap` turns a
client's convolution into one grouped convolution over clients x channels, which XLA:CPU runs at a
small fraction of its matmul speed (benchmarks/RESULTS.md, "The CPU convolution path": a cohort of the
pfl CIFAR-10 CNN ran 17x slower than this formulation). Written as windows @ kernel, the vmapped
convolution is a batched matrix product (one batch entry per client), which every backend runs at
full speed; its gradient is slices, pads and matmuls. Which of the two a cohort uses is measured at
setup (`ml_ecs.core.autotune`); the results agree to float rounding (tests/unit/test_conv.py).
"""
from __future__ import annotations

import itertools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ('xla', 'matmul')   # lax.conv_general_dilated | matmul_conv
CONV_SETTINGS = ('auto',) + CONV_IMPLS   # train.conv_impl: 'auto' = measured per cohort (ml_ecs.core.autotune)


def _channels_last(dimension_numbers, ndim: int) -> bool:
  """Whether `dimension_numbers` are (N, *spatial, C) inputs and outputs and (*spatial, I, O) kernels."""
  if dimension_numbers is None:
    return False
  dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers) \
      if not isinstance(dimension_numbers, lax.ConvDimensionNumbers) else dimension_numbers
  spatial = tuple(range(1, ndim - 1))
  return (tuple(dn.lhs_spec) == (0, ndim - 1) + spatial and tuple(dn.out_spec) == (0, ndim - 1) + spatial
          and tuple(dn.rhs_spec) == (ndim - 1, ndim - 2) + tuple(range(ndim - 2)))


def matmul_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count: int = 1, precision=None,
                preferred_element_type=None, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` with the same arguments, computed as windows @ kernel for channels-last
  layouts without dilation or feature groups; any other case is passed to `lax.conv_general_dilated`."""
  ndim = lhs.ndim
  plain = (feature_group_count == 1 and all(d == 1 for d in (lhs_dilation or (1,)))
           and all(d == 1 for d in (rhs_dilation or (1,))) and _channels_last(dimension_numbers, ndim))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type, **kwargs)
  window = rhs.shape[:-2]
  strides = tuple(window_strides)
  pads = lax.padtype_to_pads(lhs.shape[1:-1], window, strides, padding) if isinstance(padding, str) else padding
  x = jnp.pad(lhs, ((0, 0), *[tuple(p) for p in pads], (0, 0)))
  out = [(x.shape[1 + i] - k) // s + 1 for i, (k, s) in enumerate(zip(window, strides))]
  # One shifted (strided) view per kernel offset, in the kernel's row-major order, stacked on channels.
  views = [x[(slice(None), *[slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out, strides)], slice(None))]
           for offset in itertools.product(*map(range, window))]
  windows = jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]
  kernel = rhs.reshape(-1, rhs.shape[-1])
  return lax.dot_general(windows, kernel, (((ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def conv_function(impl: str) -> Callable[..., jax.Array]:
  """The `conv_general_dilated` of implementation `impl` (one of CONV_IMPLS)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'convolution implementation {impl!r}: expected one of {CONV_IMPLS}')
  return matmul_conv if impl == 'matmul' else lax.conv_general_dilated
