"""Usage statistics of hard codes: per-digit empirical entropy and code usage (all in bits).

Every quantizer reports these in `QuantizerOutput.metrics`; evaluation code can call them directly
on the codes of a whole held-out set.
"""

import math

import jax
import jax.numpy as jnp

from bitgen.quantizers import bits as bits_lib


def _plogp(p: jax.Array) -> jax.Array:
  """p * log2(p) with 0 log 0 = 0."""
  return jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0)


def bit_entropy(bits: jax.Array) -> jax.Array:
  """(..., L) {0,1} -> (L,) empirical entropy of each bit over all tokens, in bits, in [0, 1]."""
  p_one = jnp.mean(bits.reshape(-1, bits.shape[-1]).astype(jnp.float32), axis=0)
  return -(_plogp(p_one) + _plogp(1.0 - p_one))


def level_entropy(digits: jax.Array, levels: tuple[int, ...]) -> jax.Array:
  """(..., D) level digits -> (D,) empirical entropy of each channel, in bits, in [0, log2 L_d]."""
  flat = digits.reshape(-1, len(levels))
  entropies = []
  for d, num_levels in enumerate(levels):
    counts = jnp.zeros((num_levels,), jnp.float32).at[flat[:, d]].add(1.0)
    entropies.append(-jnp.sum(_plogp(counts / flat.shape[0])))
  return jnp.stack(entropies)


def count_distinct_rows(keys: jax.Array) -> jax.Array:
  """(..., K) integers -> () int32 number of distinct K-tuples over all leading positions."""
  flat = keys.reshape(-1, keys.shape[-1])
  if flat.shape[0] == 0:
    return jnp.zeros((), jnp.int32)
  # lexsort: the last key is the primary one; any total order works for counting.
  order = jnp.lexsort(tuple(flat[:, k] for k in range(flat.shape[1])))
  ordered = flat[order]
  changes = jnp.any(ordered[1:] != ordered[:-1], axis=-1)
  return 1 + jnp.sum(changes, dtype=jnp.int32)


def code_usage(keys: jax.Array, codebook_size: float) -> dict[str, jax.Array]:
  """Distinct codes among the rows of keys (..., K), and code_usage = distinct / min(codes, size).

  The denominator is what a batch can reach at most (as `bitgen.eval.metrics.code_statistics`).
  """
  distinct = count_distinct_rows(keys)
  reachable = max(1, min(math.prod(keys.shape[:-1]), codebook_size))
  return {"distinct_codes": distinct,
          "code_usage": distinct.astype(jnp.float32) / jnp.float32(reachable)}


def usage_metrics(bits: jax.Array) -> dict[str, jax.Array]:
  """The usage statistics of binary codes (..., L), as named in `QuantizerOutput.metrics`."""
  return {"bit_entropy": bit_entropy(bits),
          **code_usage(bits_lib.pack_bits(bits), 2.0 ** bits.shape[-1])}
