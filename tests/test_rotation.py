"""Rotations (qtrain/layers/rotation.py, qtrain/convert/rotate.py).

References: float64 NumPy (H H^T = n I, the dense products the fast transform
must equal, R R^T = I), the unrotated model itself (a fused rotation must not
change the logits), and the lowered program (how many online rotations run).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from qtrain.layers import rotation

SUPPORTED = [n for n in range(1, 1025) if rotation.supported(n)]


def test_supported_list_is_what_the_constructions_give():
  # Orders of Hadamard matrices are 1, 2 or multiples of 4; below 1024 the
  # ones Sylvester x Paley I/II (primes only) miss are these (hand-checked:
  # 52 = 4*13 needs q = 25, 92 = q + 1 with q = 91 = 7*13, 172 = 4*43).
  assert all(n in (1, 2) or n % 4 == 0 for n in SUPPORTED)
  for n in (1, 2, 4, 12, 20, 24, 28, 36, 40, 44, 48, 60, 96, 768, 1024, 5632):
    assert rotation.supported(n), n
  for n in (3, 6, 52, 92, 100, 116, 172):
    assert not rotation.supported(n), n
  assert rotation.factor(5632) == (44, 128)  # llama_1b's d_ff: Paley I (q = 43) x 2^7.
  assert rotation.factor(28) == (28, 1)  # Paley II, q = 13.


def test_hadamard_matrices_are_hadamard():
  """Every supported order up to 1024: entries +-1 and H H^T = n I exactly
  (the product in float32, exact for integer sums below 2^24: no tolerance)."""
  for n in SUPPORTED:
    h = rotation.hadamard_matrix(n)
    assert h.dtype == np.float64 and h.shape == (n, n)
    assert np.array_equal(np.abs(h), np.ones((n, n))), n
    h32 = h.astype(np.float32)
    np.testing.assert_array_equal(h32 @ h32.T, n * np.eye(n, dtype=np.float32), err_msg=str(n))


def test_unsupported_size_names_the_neighbours():
  with pytest.raises(ValueError, match=r"config.model.d_ff=172.*168 and 176"):
    rotation.require_supported(172, "config.model.d_ff")
  with pytest.raises(ValueError, match="nearest supported sizes are 48 and 56"):
    rotation.hadamard_matrix(52)


@pytest.mark.parametrize("n", [8, 12, 28, 40, 352])
@pytest.mark.parametrize("randomized", [False, True])
def test_fast_transform_equals_dense_matmul(n, randomized):
  """x diag(s) H / sqrt(n) by butterfly + m x m matmul vs the float64 dense
  product: float32 rounding of ~log2(n) + m-term sums, 2e-6 relative."""
  x = np.random.default_rng(n).standard_normal((3, 5, n)).astype(np.float32)
  s = rotation.random_signs(n, seed=n) if randomized else None
  r = rotation.rotation_matrix(n, s)
  ref = x.astype(np.float64) @ r
  got = np.asarray(rotation.hadamard_transform(jnp.asarray(x), s), np.float64)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
  back = np.asarray(rotation.hadamard_transform(jnp.asarray(got, jnp.float32), s, inverse=True))
  np.testing.assert_allclose(back, x, rtol=0, atol=2e-6 * np.abs(x).max())


def test_randomized_hadamard_inverse_exact_in_float64():
  """R = diag(s) H / sqrt(n) is orthogonal: R R^T = I to float64 rounding."""
  for n in (12, 28, 44, 64):
    s = rotation.random_signs(n, seed=3)
    assert set(np.unique(s)) == {-1.0, 1.0}
    r = rotation.rotation_matrix(n, s)
    np.testing.assert_allclose(r @ r.T, np.eye(n), rtol=0, atol=1e-12)
  np.testing.assert_array_equal(rotation.random_signs(64, 5), rotation.random_signs(64, 5))
  assert not np.array_equal(rotation.random_signs(64, 5), rotation.random_signs(64, 6))


def test_cayley_rotation_orthogonal_and_inverse():
  """R = (I - A)(I + A)^-1 against its definition with float64 NumPy
  inverses (1e-12), orthogonal (1e-12), and in float32 R^T R = I, R^-1 = R^T (1e-6)."""
  w = np.random.default_rng(0).standard_normal((16, 16))
  with jax.enable_x64(True):
    a = rotation.skew(jnp.asarray(w))
    r = np.asarray(rotation.cayley(a))
    eye = np.eye(16)
    ref = (eye - np.asarray(a)) @ np.linalg.inv(eye + np.asarray(a))
    np.testing.assert_allclose(r, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r @ r.T, eye, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(rotation.cayley_inverse(a)), r.T, rtol=0, atol=1e-12)
  a32 = rotation.skew(jnp.asarray(w, jnp.float32) * 0.3)
  r32 = np.asarray(rotation.cayley(a32), np.float64)
  np.testing.assert_allclose(r32.T @ r32, np.eye(16), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rotation.cayley_inverse(a32)), r32.T, rtol=0, atol=1e-6)
