"""Rotations (qtrain/layers/rotation.py, qtrain/convert/rotate.py).

References: float64 NumPy (H H^T = n I, the dense products the fast transform
must equal, R R^T = I), the unrotated model itself (a fused rotation must not
change the logits), and the lowered program (how many online rotations run).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain.convert.rotate import drop_online, fuse_rotations
from qtrain.layers import FormRule, ModelConfig, Provider, Transformer, rotation
from qtrain.layers.config import RotationConfig
from qtrain.quant.provider import QuantProvider
from qtrain.quant.rules import QuantRule
from qtrain.quant.spec import QuantSpec

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
  """Every supported order up to 256 and every 8th above up to 1024 (with
  1020 = Paley I q = 1019, 1024; all 191 take 12 s on this machine): entries
  +-1 and H H^T = n I exactly (the product in float32, exact for integer sums
  below 2^24: no tolerance)."""
  large = [n for n in SUPPORTED if n > 256]
  for n in [n for n in SUPPORTED if n <= 256] + large[::8] + [1020, 1024]:
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


@pytest.mark.parametrize("n", [8, 12, 28, 40, 352, 512])
@pytest.mark.parametrize("impl", ["fwht", "matmul"])
def test_fast_transform_equals_dense_matmul(n, impl):
  """x diag(s) H / sqrt(n), by butterfly + m x m matmul or by one matmul per
  Kronecker factor (512 = 128 * 4: two), with and without random signs, vs
  the float64 dense product: float32 rounding of sums of up to n terms, 2e-6
  of max |x H|; the inverse gives x back as closely."""
  x = np.random.default_rng(n).standard_normal((3, 5, n)).astype(np.float32)
  for s in (None, rotation.random_signs(n, seed=n)):
    ref = x.astype(np.float64) @ rotation.rotation_matrix(n, s)
    got = np.asarray(rotation.hadamard_transform(jnp.asarray(x), s, impl=impl), np.float64)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    back = np.asarray(rotation.hadamard_transform(jnp.asarray(got, jnp.float32), s,
                                                  inverse=True, impl=impl))
    np.testing.assert_allclose(back, x, rtol=0, atol=2e-6 * np.abs(x).max())


def test_matmul_transform_in_bfloat16_rounds_once():
  """bf16 input: the +-1 factors and signs are exact in bf16 and the sums
  float32, so the result is the float64 product of the bf16 values rounded
  once to bf16 (half an ulp: 2^-8 relative, per element)."""
  n = 352  # llama_1b:smoke's d_ff: Paley 44 x 8.
  xb = jnp.asarray(np.random.default_rng(0).standard_normal((4, n)), jnp.bfloat16)
  s = rotation.random_signs(n, 1)
  ref = np.asarray(xb, np.float64) @ rotation.rotation_matrix(n, s)
  for impl in ("fwht", "matmul"):  # matmul_bf16 rounds twice: the next test.
    got = np.asarray(rotation.hadamard_transform(xb, s, impl=impl), np.float64)
    np.testing.assert_allclose(got, ref, rtol=2 ** -8, atol=1e-6)


U_BF16 = 2.0 ** -8  # bf16's unit roundoff (8-bit significand): |fl(v) - v| <= u |v|.


@pytest.mark.parametrize("n", [64, 352, 5632])  # R3 head_dim (dense), smoke d_ff, llama_1b d_ff.
def test_bf16_transform_vs_float64(n):
  """bf16 x (llama_1b's R3 and R4 sizes) vs the float64 product of the same
  bf16 values, bounded per element. x is X [a, b] per row, U = X H_b (a = 1,
  dense: U = x), y = H_a^T U / sqrt(n). "matmul": the products x_i * (+-1) are
  exact and the sums float32, so |y - ref| <= u |ref| (one rounding to bf16)
  plus the float32 sums' worst case, (g_b sum|X| + g_a sum_a |U[a, c]|) /
  sqrt(n) with g_k = k 2^-24 (recursive summation of k terms). "matmul_bf16"
  (two gemms, n > 256) also rounds U to bf16: each U entry moves by <= u |U|,
  which reaches output [d, c] as <= u sum_a |U[a, c]| / sqrt(n). Dense n is
  one matmul, one rounding in both."""
  # Channel scales spread over e^(+-2): outlier channels, as R3/R4 get.
  x = np.random.default_rng(n).standard_normal((8, n))
  xb = jnp.asarray(x * np.exp(np.random.default_rng(1).standard_normal(n)), jnp.bfloat16)
  x64 = np.asarray(xb, np.float64)
  s = rotation.random_signs(n, 2)
  ref = x64 @ rotation.rotation_matrix(n, s)
  a, b = rotation._split(n)  # pylint: disable=protected-access
  u_abs = np.abs((x64 * s).reshape(-1, a, b) @ rotation.hadamard_matrix(b))  # |U| [rows, a, b].
  col = lambda v: np.repeat(v.sum(1, keepdims=True), a, 1).reshape(ref.shape) / np.sqrt(n)
  g = lambda k: 1.01 * k * 2.0 ** -24
  sums = g(b) * np.abs(x64).sum(-1, keepdims=True) / np.sqrt(n) + (0 if a == 1 else
                                                                   g(a) * col(u_abs))
  inter = 0 if a == 1 else U_BF16 * (1 + U_BF16) * col(u_abs)
  for impl, bound in (("matmul", U_BF16 * np.abs(ref) + sums),
                      ("matmul_bf16", U_BF16 * np.abs(ref) + sums + inter)):
    yb = rotation.hadamard_transform(xb, s, impl=impl)
    assert yb.dtype == jnp.bfloat16
    got = np.asarray(yb, np.float64)
    assert np.all(np.abs(got - ref) <= bound), (impl, np.max(np.abs(got - ref) / bound))


@pytest.mark.parametrize("impl", ["matmul", "matmul_bf16"])
def test_gradient_is_the_transposed_rotation(impl):
  """d/dx sum(w * (x R)) = w R^T: the matmul impls' custom VJP runs the inverse
  transform on the cotangent; vs float64 w R^T within 2e-6 of its max
  (float32 sums), for the dense (64) and the two-gemm (352 = 44 x 8, the
  path of 5632 = 44 x 128) path, with and without the inverse flag."""
  for n in (64, 352):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, n)), jnp.float32)
    w = np.random.default_rng(1).standard_normal((2, 3, n))
    s = rotation.random_signs(n, 3)
    r = rotation.rotation_matrix(n, s)
    for inverse, want in ((False, w @ r.T), (True, w @ r)):
      g = jax.grad(lambda z: jnp.sum(jnp.asarray(w, jnp.float32) * rotation.hadamard_transform(
          z, s, inverse=inverse, impl=impl)))(x)
      np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=0,
                                 atol=2e-6 * np.abs(want).max(), err_msg=f"{n} {inverse}")


def _primitives(fn, *args) -> list:
  """(name, input dtypes) of every primitive in fn's jaxpr, nested calls included."""
  out = []

  def walk(j):
    for e in j.eqns:
      out.append((e.primitive.name, tuple(str(v.aval.dtype) for v in e.invars)))
      for p in e.params.values():
        for q in (p if isinstance(p, (tuple, list)) else (p,)):
          if hasattr(q, "jaxpr") and hasattr(q.jaxpr, "eqns"):
            walk(q.jaxpr)
          elif hasattr(q, "eqns"):
            walk(q)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


def test_matmul_transform_program_is_bf16_gemms_without_transposes():
  """The program the matmul impls run on bf16 activations (llama_1b's R4,
  d_ff 5632 = 44 x 128, and R3, head_dim 64), forward and backward: no
  transpose anywhere; the gemms take bf16 operands where the impl says
  (matmul: the 128 one, the 44 one on the float32 intermediate; matmul_bf16:
  both) and accumulate in float32; R3 is a single dense gemm each way."""
  s = rotation.random_signs(5632, 0)
  expect = {"matmul": [("bfloat16", "bfloat16"), ("float32", "float32")],
            "matmul_bf16": [("bfloat16", "bfloat16"), ("bfloat16", "bfloat16")]}
  for impl, dots in expect.items():
    for n, want in ((5632, dots), (64, [("bfloat16", "bfloat16")])):
      x = jnp.zeros((2, 8, n), jnp.bfloat16)
      sn = s[:n] if n == 5632 else rotation.random_signs(n, 0)
      fwd = lambda z: rotation.hadamard_transform(z, sn, impl=impl)
      bwd = lambda z: jax.vjp(fwd, z)[1](z)[0]
      for fn, times in ((fwd, 1), (bwd, 2)):  # The VJP's jaxpr holds the forward too.
        prims = _primitives(fn, x)
        assert not [p for p in prims if p[0] == "transpose"], (impl, n, prims)
        assert [d for name, d in prims if name == "dot_general"] == want * times, (impl, n)
def test_fwht_is_the_unsigned_transform():
  """The FFN Hadamard's butterfly (``hadamard.fwht``, ``ffn_hadamard``) and
  ``hadamard_transform`` without signs are the same map for n = 2^k (both
  Sylvester's ordering), so either can serve the other: float32, 1e-6 of max."""
  from qtrain.layers.hadamard import fwht  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 256)), jnp.float32)
  want = np.asarray(x, np.float64) @ rotation.rotation_matrix(256)
  # fwht compiled (as in the model): op by op, each of its 8 stages' ops compiles alone.
  for got in (jax.jit(fwht)(x), rotation.hadamard_transform(x, impl="matmul")):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                               atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("impl", ["matmul", "matmul_bf16"])
def test_transform_sharded_equals_one_device(impl):
  """Rows sharded over ``data`` and the rotated axis over ``tensor`` (as
  MLP_HIDDEN is under tensor parallelism), on 4 x 2 host devices: the same
  numbers as one device (float32; the split sums of a sharded contraction
  round differently: 1e-6 of max), forward and gradient."""
  assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test does)"
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  sh = NamedSharding(mesh, P("data", None, "tensor"))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4, 352)), jnp.float32)
  s = rotation.random_signs(352, 0)
  f = lambda z: rotation.hadamard_transform(z, s, impl=impl)
  g = jax.grad(lambda z: jnp.sum(jnp.sin(f(z))))
  want, want_g = f(x), g(x)
  got, got_g = jax.jit(f)(jax.device_put(x, sh)), jax.jit(g)(jax.device_put(x, sh))
  # Rows stay where they are (the rotated axis comes back whole, as with fwht:
  # the model's logical constraint after R4 re-splits it).
  assert got.sharding.spec[0] == got_g.sharding.spec[0] == "data"
  for a, b in ((got, want), (got_g, want_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                               atol=1e-6 * np.abs(np.asarray(b)).max())


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


def test_learned_rotation_stays_orthogonal_under_gradient_steps():
  """LearnedRotation starts at I and, after SGD steps on its free param
  towards a random target, is still orthogonal (float32: 1e-5) and moved."""
  mod = rotation.LearnedRotation(8)
  params = mod.init(jax.random.key(0))
  np.testing.assert_array_equal(mod.apply(params), np.eye(8, dtype=np.float32))
  target = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)
  loss = jax.jit(jax.value_and_grad(lambda p: jnp.sum((mod.apply(p) - target) ** 2)))
  l0, _ = loss(params)
  for _ in range(5):
    _, g = loss(params)
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, g)
  r = np.asarray(mod.apply(params), np.float64)
  np.testing.assert_allclose(r @ r.T, np.eye(8), rtol=0, atol=1e-5)
  assert loss(params)[0] < l0 and np.abs(r - np.eye(8)).max() > 0.1


# ---------------------------------------------------------------- the model

# No power of two among D = 48 = 12*4, H = 12 (Paley I), F = 88 = 44*2: every
# rotation runs its dense Paley part. init_std 0.15 and norm gains 1 + 0.3 N(0, 1)
# so a wrong fold moves logits by O(1), far above the tolerance.
CFG = ModelConfig(vocab_size=128, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                  d_ff=88, init_std=0.15, max_seq_len=64)
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 16)), jnp.int32)
ALL = dict(r1="random_hadamard", r2="random_hadamard", r3="random_hadamard",
           r4="random_hadamard", seed=7)
# Per block: R2 on block 1, R3 on block 0, R4 on block 1 (a table under scan).
MIXED = dict(r1="hadamard", r2="hadamard", r2_layers=(1,), r3="random_hadamard",
             r3_layers="0", r4="random_hadamard", r4_layers=(1,))


def random_params(cfg: ModelConfig, seed: int = 0):
  shapes = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1 + 0.3 * rng.standard_normal(s.shape), s.dtype)
    return jnp.asarray(cfg.init_std * rng.standard_normal(s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def logits(cfg, params):
  return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, TOKENS), np.float64)


@functools.lru_cache(maxsize=None)
def plain(scan: bool, tie: bool):
  cfg = dataclasses.replace(CFG, scan_layers=scan, tie_embeddings=tie)
  params = random_params(cfg)
  return cfg, params, logits(cfg, params)


@pytest.mark.parametrize("scan,tie,rot", [
    (True, False, dict(r1="random_hadamard")),
    (True, False, dict(r2="random_hadamard")),
    (True, False, dict(r4="random_hadamard")),
    (True, False, ALL),
    (False, True, dict(ALL, impl="matmul")),
    (True, False, MIXED),
    (False, True, MIXED),
])
def test_fused_rotations_keep_the_function(scan, tie, rot):
  """Rotated + fused logits = plain logits within 1e-5 of max |logit| in
  float32: the rotations are exact, so only float32 rounding of the folded
  products and of the online transforms remains (observed <= 1.5e-6)."""
  cfg, params, ref = plain(scan, tie)
  fused, cfg2 = fuse_rotations(params, cfg, rot)
  assert cfg2.rotation == RotationConfig.of(rot)
  assert cfg2.tie_embeddings == (tie and rot.get("r1", "none") == "none")
  if rot.get("r1", "none") != "none":  # Norm gains folded away, weights changed.
    assert np.all(np.asarray(fused["final_norm"]["scale"]) == 1)
    assert not np.allclose(fused["embedding"], params["embedding"])
  got = logits(cfg2, fused)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_gradients_through_online_rotations_under_scan_and_remat():
  """Online R3 (per block: a lax.cond) and R4 (down_proj fused) under scan
  with full remat: the model is the same function of every param but
  down_proj, so its gradients w.r.t. those equal the plain model's (float32:
  1e-5 of the largest gradient entry)."""
  cfg, params, _ = plain(True, False)
  cfg = dataclasses.replace(cfg, remat_policy="full")
  rot = dict(r3="random_hadamard", r3_layers=(1,), r4="hadamard", r4_layers=(0,))
  fused, cfg2 = fuse_rotations(params, cfg, rot)

  def grads(c, p):
    loss = lambda p: jnp.mean(Transformer(c).apply({"params": p}, TOKENS) ** 2)
    return jax.jit(jax.grad(loss))(p)
  g, g2 = grads(cfg, params), grads(cfg2, fused)
  layers = lambda x, mod, name: x["decoder"]["layers"][mod][name]["kernel"]
  for get in (lambda x: x["embedding"], lambda x: x["lm_head"]["kernel"],
              lambda x: layers(x, "attn", "q_proj"), lambda x: layers(x, "attn", "k_proj"),
              lambda x: layers(x, "mlp", "up_proj")):
    a, b = np.asarray(get(g)), np.asarray(get(g2))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


def test_drop_online_keeps_the_function():
  """For exporters without online rotations: R4 folded back into down_proj,
  R3 dropped; same logits (1e-5 of max |logit|), R1/R2 still fused."""
  cfg, params, ref = plain(True, False)
  fused, cfg2 = fuse_rotations(params, cfg, MIXED)
  saving = dataclasses.replace(cfg2, rotation=dataclasses.replace(cfg2.rotation, save=True))
  back, cfg3 = drop_online(fused, saving)
  assert (cfg3.rotation.r1, cfg3.rotation.r3, cfg3.rotation.r4) == ("hadamard", "none", "none")
  assert not cfg3.rotation.save  # Nothing online left to save (save=True would not validate).
  np.testing.assert_allclose(logits(cfg3, back), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_learned_rotations_fuse_exactly():
  """Cayley rotations (R1 [D, D], R2 one per block [L, H, H]) passed as
  matrices: same function (1e-5 of max |logit|)."""
  cfg, params, ref = plain(True, False)
  rng = np.random.default_rng(4)
  r1 = rotation.cayley(rotation.skew(jnp.asarray(rng.standard_normal((48, 48)), jnp.float32)))
  r2 = rotation.cayley(rotation.skew(jnp.asarray(rng.standard_normal((2, 12, 12)), jnp.float32)))
  fused, cfg2 = fuse_rotations(params, cfg, dict(r1="learned", r2="learned"), r1=r1, r2=r2)
  np.testing.assert_allclose(logits(cfg2, fused), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  with pytest.raises(ValueError, match=r"rotation.r1='learned': pass its matrix"):
    fuse_rotations(params, cfg, dict(r1="learned"))


def test_fuse_refuses_twice_and_factored_weights():
  cfg, params, _ = plain(True, False)
  fused, cfg2 = fuse_rotations(params, cfg, ALL)
  with pytest.raises(ValueError, match="rotate twice"):
    fuse_rotations(fused, cfg2, ALL)
  low = dataclasses.replace(cfg, weight_forms=(FormRule(r".*/q_proj", "low_rank", (("rank", 4),)),))
  with pytest.raises(ValueError, match=r"q_proj holds \['a', 'b'\].*config.model.weight_forms"):
    fuse_rotations(random_params(low), low, dict(r1="hadamard"))


def test_cached_decoding_of_the_rotated_model():
  """Decoding with the KV cache (R3 rotates K before it is stored, on block
  0 only under scan) gives the plain model's full-forward logits: float32
  on both paths, within 1e-5 of max |logit| as above."""
  from qtrain.layers.kv_cache import init_cache  # pylint: disable=g-import-not-at-top
  from qtrain.train.sample import decode  # pylint: disable=g-import-not-at-top
  cfg, params, ref = plain(True, False)
  fused, cfg2 = fuse_rotations(params, cfg, MIXED)
  model = Transformer(cfg2)
  step = jax.jit(decode, static_argnums=0)
  cache = init_cache(model, 2, 16)
  pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
  out, cache = step(model, fused, cache, TOKENS[:, :9], pos[:, :9])
  outs = [out]
  for t in range(9, 16):
    out, cache = step(model, fused, cache, TOKENS[:, t:t + 1], pos[:, t:t + 1])
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), ref, rtol=0,
                             atol=1e-5 * np.abs(ref).max())


def _hadamard_calls(cfg) -> int:
  model = Transformer(cfg)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), TOKENS))["params"]
  text = jax.jit(lambda p: model.apply({"params": p}, TOKENS)).lower(params).as_text()
  return len(re.findall(r"call @hadamard_transform(_\d+)?\(", text))


def test_online_rotations_in_the_program():
  """Each online rotation is one jitted ``hadamard_transform``, so the
  lowered program has one ``call @hadamard_transform`` per rotated tensor:
  R3 on Q and on K, R4 on the down_proj input = 3 per block. Unscanned, 3 per
  block in the program; scanned, 3 in the one block body (blocks differing:
  each inside a ``stablehlo.case`` branch)."""
  on = RotationConfig(r3="hadamard", r4="random_hadamard")
  assert _hadamard_calls(dataclasses.replace(CFG, scan_layers=False, rotation=on)) == 6
  assert _hadamard_calls(dataclasses.replace(CFG, scan_layers=True, rotation=on)) == 3
  assert _hadamard_calls(CFG) == 0
  every = RotationConfig.of(dict(r3="hadamard", r3_layers="all", r4="hadamard", r4_layers="0-1"))
  assert every.blocks("r3", 2) == every.blocks("r4", 2) == (True, True)
  assert _hadamard_calls(dataclasses.replace(CFG, scan_layers=True, rotation=every)) == 3
  some = RotationConfig.of(dict(r3="hadamard", r3_layers=(1,), r4="hadamard", r4_layers=(0,)))
  assert _hadamard_calls(dataclasses.replace(CFG, scan_layers=False, rotation=some)) == 3


# R3 over head_dim 12 (one dense gemm) and R4 over d_ff 352 = 44 x 8 (two
# gemms, the second batched over rows): both ways ``_by_matmuls`` builds them.
SAVE_CFG = dataclasses.replace(CFG, d_ff=352, rotation=RotationConfig(
    r3="random_hadamard", r4="random_hadamard", seed=5))
_GEMMS = 2 + 2  # Rotation gemms of one block's forward: Q and K, then R4's two.


def _grad_fn(cfg):
  loss = lambda p: jnp.mean(Transformer(cfg).apply({"params": p}, TOKENS) ** 2)
  return loss, jax.jit(jax.value_and_grad(loss))


def _rotation_gemms(cfg, params, weights: bool = False) -> int:
  """Rotation gemms of the gradient program (``rotation.transform_gemms`` on
  its jaxpr). On this CPU, float32, the compiled program's dots named after
  ``hadamard_transform`` give the same counts; bf16 ones XLA's CPU backend
  turns into fusions, and a GPU into cuBLAS calls, so the jaxpr is the
  backend-independent count."""
  return rotation.transform_gemms(jax.make_jaxpr(jax.grad(_grad_fn(cfg)[0]))(params), weights)


@pytest.mark.parametrize("fold,policy,counts", [
    (False, "dots_no_batch", (2 * _GEMMS + 1, 2 * _GEMMS)),
    (False, "full", (3 * _GEMMS, 2 * _GEMMS)),
    (True, "dots_no_batch", (2 * _GEMMS, 2 * _GEMMS - 2)),
    (True, "full", (3 * _GEMMS - 2, 2 * _GEMMS - 2))])
def test_saved_rotations_run_forward_and_backward_only(fold, policy, counts):
  """rotation.save: the backward reads the rotated tensors instead of
  recomputing them, so every rotation gemm runs twice (forward, VJP).
  Without it, dots_no_batch keeps the dense gemm (a dot output) and R4's
  first gemm but reruns R4's row-batched one; full reruns all 4. With
  fold_grad R4's VJP runs on down_proj's weight instead (2 gemms over
  [d_model, d_ff], counted apart), and its forward, inside a custom VJP,
  reruns whole unless saved. Same loss and grads as no remat at all: remat
  only chooses what is kept, the ops are the same float32 ops (fusion may
  reorder sums: rtol 1e-6 on the loss, 1e-5 of the largest entry on each
  grad; measured bit-identical on this CPU)."""
  base = dataclasses.replace(SAVE_CFG, rotation=dataclasses.replace(SAVE_CFG.rotation,
                                                                    fold_grad=fold))
  params = random_params(base)
  ref_loss, ref_grads = _grad_fn(base)[1](params)
  off = dataclasses.replace(base, remat_policy=policy)
  on = dataclasses.replace(off, rotation=dataclasses.replace(off.rotation, save=True))
  assert (_rotation_gemms(off, params), _rotation_gemms(on, params)) == counts
  assert _rotation_gemms(on, params, weights=True) == (2 if fold else 0)
  for cfg in (off, on):
    loss, grads = _grad_fn(cfg)[1](params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=0,
                                                         atol=1e-5 * np.abs(r).max()),
                 grads, ref_grads)


def _fold_grads(cfg, fold: bool, provider=None):
  """(loss, grads, R4 gemms on activations, on down_proj's weight) of the
  gradient program with fold_grad=``fold``."""
  cfg = dataclasses.replace(cfg, rotation=dataclasses.replace(cfg.rotation, fold_grad=fold))
  params = random_params(cfg)
  loss = lambda p: jnp.mean(Transformer(cfg, provider).apply({"params": p}, TOKENS) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return (value, grads, rotation.transform_gemms(jaxpr),
          rotation.transform_gemms(jaxpr, weights=True))


A4_STE = QuantSpec(bits=4, granularity="token", symmetric=False, calibration="minmax")
W4 = QuantSpec(bits=4, granularity="channel")


@pytest.mark.parametrize("scan,r4_layers,act,folds", [
    (True, None, None, True),  # bf16-style training: no quantizer.
    (False, (1,), None, True),  # Unscanned, R4 on block 1 only (static).
    (True, (1,), A4_STE, True),  # Scanned table (lax.cond), W4A4 with a plain STE.
    (True, None, dataclasses.replace(A4_STE, estimator="clipped_ste"), False),
])
def test_r4_gradient_through_the_weight(scan, r4_layers, act, folds):
  """fold_grad: R4's backward is dy (R W^)^T on down_proj's weight operand
  instead of R^T on the [tokens, d_ff] cotangent, the same gradients (float32:
  the loss to 1e-6, each grad to 1e-5 of its largest entry, as above: only
  the order of the sums differs) where every provider passes the activations'
  cotangent on (none, a plain STE quantizer); a clipped STE masks the
  cotangent, so there the transform's VJP still runs (no weight gemms)."""
  cfg = dataclasses.replace(SAVE_CFG, scan_layers=scan, rotation=dataclasses.replace(
      SAVE_CFG.rotation, r4_layers=r4_layers))
  provider = None if act is None else QuantProvider(
      rules=(QuantRule(pattern=r"decoder/layers/.*", weight=W4, act=act),))
  ref_loss, ref_grads, ref_act, ref_w = _fold_grads(cfg, False, provider)
  loss, grads, n_act, n_w = _fold_grads(cfg, True, provider)
  blocks = 1 if scan else sum(cfg.rotation.blocks("r4", cfg.n_layers))
  assert ref_w == 0
  # R4 over 44 x 8: two gemms per rotation, the VJP's moved onto the weight.
  assert (n_act, n_w) == ((ref_act - 2 * blocks, 2 * blocks) if folds else (ref_act, 0))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=0,
                                                       atol=1e-5 * np.abs(r).max()),
               grads, ref_grads)


def test_save_is_a_bool():
  """ConfigDict refuses save="yes" itself; a ModelConfig built in code is checked here."""
  cfg = dataclasses.replace(SAVE_CFG, remat_policy="full",
                            rotation=RotationConfig(r4="hadamard", save="yes"))
  with pytest.raises(ValueError, match=r"config.model.rotation.save='yes'; use True or False"):
    rotation.check_rotation(cfg)


def test_saved_rotations_are_the_named_residuals(capsys):
  """Unscanned (named residuals are listed per block): with rotation.save the
  residuals are the named rotated tensors, Q and K per block (R3) and the
  down_proj input (R4), in place of R4's intermediate (the first gemm's
  output), which no longer needs keeping; dots_no_batch holds the same
  bytes (in float32 the rotated tensor and the intermediate are the same
  size). Per-block rotations (a lax.cond) are named outside the cond and
  give the no-remat loss and grads (tolerances as above). R4's gradient as
  the transform's VJP (fold_grad=False): folded, its forward runs inside a
  custom VJP, whose intermediate no policy keeps."""
  cfg = dataclasses.replace(SAVE_CFG, scan_layers=False, remat_policy="dots_no_batch",
                            rotation=dataclasses.replace(SAVE_CFG.rotation, fold_grad=False))
  params = random_params(cfg)
  saved = dataclasses.replace(cfg, rotation=dataclasses.replace(cfg.rotation, save=True))

  def residuals(c):
    jax.ad_checkpoint.print_saved_residuals(_grad_fn(c)[0], params)
    text = capsys.readouterr().out
    vjp = jax.eval_shape(lambda p: jax.vjp(_grad_fn(c)[0], p)[1], params)
    return text, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp))
  (text_off, bytes_off), (text_on, bytes_on) = residuals(cfg), residuals(saved)
  assert "rotated" not in text_off
  assert text_on.count("named 'r3_rotated'") == 2 * cfg.n_layers
  assert text_on.count("named 'r4_rotated'") == cfg.n_layers
  assert "f32[2,16,44,8]" in text_off and "f32[2,16,44,8]" not in text_on
  assert bytes_on == bytes_off
  mixed = dataclasses.replace(SAVE_CFG, remat_policy="full", rotation=RotationConfig.of(
      dict(r3="hadamard", r3_layers=(1,), r4="random_hadamard", r4_layers=(0,), save=True)))
  params = random_params(mixed)
  ref_loss, ref_grads = _grad_fn(dataclasses.replace(mixed, remat_policy="none"))[1](params)
  loss, grads = _grad_fn(mixed)[1](params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * np.abs(r).max()),
               grads, ref_grads)


class _Record(Provider):
  """Sows what the ``key`` site sees."""

  def activation(self, path, name, hooks, module, x):
    if name == "key":
      module.sow("intermediates", "key", x)
    return x


def test_r3_rotates_keys_before_their_site():
  """The KV quantizer's site sees K R3 (R3 = diag(s) H / sqrt(H)): the key
  site of the rotated model vs the plain model's keys times the float64
  dense R3 (float32 rounding: 1e-5 of max |K|), in every block."""
  cfg, params, _ = plain(True, False)
  keys = lambda c: np.asarray(jax.jit(functools.partial(
      Transformer(c, _Record()).apply, mutable=["intermediates"]))({"params": params}, TOKENS)[
          1]["intermediates"]["decoder"]["layers"]["attn"]["key"][0], np.float64)
  rot = RotationConfig(r3="random_hadamard", seed=3)
  k_plain, k_rot = keys(cfg), keys(dataclasses.replace(cfg, rotation=rot))
  r3 = rotation.rotation_matrix(12, rotation.signs_for(rot, "r3", 12))
  np.testing.assert_allclose(k_rot, k_plain @ r3, rtol=0, atol=1e-5 * np.abs(k_plain).max())


@pytest.mark.parametrize("change,match", [
    (dict(d_ff=172, rotation=dict(r4="hadamard")),
     r"config.model.rotation.r4='hadamard' rotates over config.model.d_ff=172.*168 and 176"),
    (dict(head_dim=10, rotation=dict(r3="random_hadamard")),
     r"rotation.r3='random_hadamard' rotates over config.model.head_dim=10.*8 and 12"),
    (dict(rotation=dict(r3="learned")), r"rotation.r3='learned'; use one of .*fused: r1 or r2"),
    (dict(rotation=dict(r4="hadamard", r4_layers="2-4")),
     r"r4_layers names block 4, but config.model.n_layers=4"),
    (dict(d_ff=64, ffn_hadamard=True, rotation=dict(r4="hadamard")), "keep one"),
    (dict(rotation=dict(r5="hadamard")), r"config.model.rotation.r5 is not a rotation field"),
    (dict(remat_policy="full", rotation=dict(save=True)),
     r"rotation.save=True saves .* r3 and r4 are 'none'"),
    (dict(rotation=dict(r4="hadamard", save=True)),
     r"rotation.save=True .* config.model.remat_policy='none' keeps every activation"),
])
def test_validation_names_the_field(change, match):
  from qtrain.config.base import base_config  # pylint: disable=g-import-not-at-top
  m = base_config().model
  m.update(dict(d_model=48, head_dim=12, d_ff=88))
  m.update(change)
  with pytest.raises(ValueError, match=match):
    rotation.check_rotation(m)


@pytest.mark.slow
def test_quantize_cli_rotates_quarot_style(smoke_run):
  """``python -m qtrain.quantize --rotate=quarot``: the rotated fp model is the
  trained one (held-out perplexity equal to 1e-5 relative: float32 rounding),
  and W4A4KV4 RTN then quantizes rotated operands (another perplexity)."""
  from qtrain.quantize.__main__ import run  # pylint: disable=g-import-not-at-top
  plain_m = run(str(smoke_run), "w4a4kv4", "rtn")
  rot_m = run(str(smoke_run), "w4a4kv4", "rtn", rotate="quarot")
  assert rot_m["out"].endswith("ptq_w4a4kv4_rtn_quarot") and rot_m["rotate"] == "quarot"
  print(f"ppl fp {plain_m['ppl_fp']} / rotated {rot_m['ppl_fp']}; w4a4kv4 rtn "
        f"{plain_m['ppl_ptq']} / rotated {rot_m['ppl_ptq']}")
  assert rot_m["ppl_fp"] == pytest.approx(plain_m["ppl_fp"], rel=1e-5)
  from qtrain.quantize.export import load_quantized  # pylint: disable=g-import-not-at-top
  emb = [np.asarray(load_quantized(m["out"])["embedding"]) for m in (plain_m, rot_m)]
  assert np.abs(emb[0] - emb[1]).max() > 0.1 * np.abs(emb[0]).max()  # E -> E R1: rotated.
  assert rot_m["ppl_ptq"] != plain_m["ppl_ptq"]
  assert len(rot_m["quantized_matmuls"]) == len(plain_m["quantized_matmuls"]) == 7
  with pytest.raises(ValueError, match="keep one"):
    run(str(smoke_run), "w4a4kv4", "rtn", rotate="quarot", ffn_hadamard=True)


def test_hf_export_of_a_model_with_online_rotations_is_the_same_function():
  """QuaRot-rotated (R1/R2 fused, R3/R4 online) -> HF Llama state dict ->
  transformers gives the unrotated model's logits: the exporter drops the
  online rotations first (HF Llama has none). float32 on both sides; the
  rotations add ~1e-6 of rounding (the exactness tests above), HF's own
  accumulation order ~6e-6 (tests/test_convert.py): 1e-4 as there."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from qtrain.convert import config_from_hf, params_from_hf_model, params_to_hf_state_dict
  config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=160, max_position_embeddings=64,
      tie_word_embeddings=False, rms_norm_eps=1e-5, attn_implementation="eager")
  torch.manual_seed(0)
  from hf_util import randomize  # pylint: disable=g-import-not-at-top
  hf = randomize(transformers.LlamaForCausalLM(config).float().eval())
  cfg = config_from_hf(hf.config)
  params, rcfg = fuse_rotations(params_from_hf_model(hf), cfg, "quarot")
  assert rcfg.rotation.r3 != "none" and rcfg.rotation.r4 != "none"
  exported = params_to_hf_state_dict(params, rcfg)
  fresh = transformers.LlamaForCausalLM(config).float().eval()
  fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in exported.items()},
                        strict=True)
  tokens = torch.from_numpy(np.random.default_rng(1).integers(0, 128, (2, 16))).long()
  with torch.no_grad():
    want, got = hf(tokens).logits.numpy(), fresh(tokens).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
