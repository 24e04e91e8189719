"""Memory passes around one quantized training matmul, read from compiled HLO.

  python benchmarks/quant_passes.py                      # CPU: both int8 paths
  python benchmarks/quant_passes.py --m=16384 --k=2048 --n=5632 --kernels=auto  # a GPU

Issue 16's int8 step lost to bf16 on the work around its int8 dots: absmax
reductions, casts, rescales and (for the Pallas kernel, whose s8 wgmma reads
both operands K-major) transposes, each a separate kernel reading and writing
whole [M, K] / [M, N] arrays. This tool counts them in the optimized HLO of
one ``lowp_matmul`` (x [M, K] bf16, w [K, N] float32, as in the model) the
way the training step runs it under the ``dots_no_batch`` remat policy:

* forward: its own program (y written in bf16, the next layer reads it);
* backward: a second program given x, w and dY, recomputing the forward's
  quantization as remat does (the forward dot itself is dead there and
  removed), then dX and dW.

Every top-level op of a non-fused computation that reads or writes an array
the size of [M, K], [M, N] or [K, N] is one pass; its bytes are those arrays'
bytes (a fusion's other operands are scale vectors). With ``--stub`` (the
default off a GPU) the Pallas kernel is replaced by an opaque stand-in (a
``pure_callback``: XLA cannot fuse into it, like the Mosaic GPU custom call),
so the CPU compiles what surrounds the kernel path; on a GPU the real kernel
is compiled. CPU fusion differs from GPU fusion in details (the CPU has
YNNPACK reductions and no multi-output fusion), so the counts are CPU's: a
change should show there first, then in a GPU run of this same script.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

_SHAPE = re.compile(r"\b(pred|s8|u8|s32|u32|bf16|f16|f32|f64|s64)\[([\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "iota"}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "f32": 4,
          "f64": 8, "s64": 8}


@dataclasses.dataclass
class Pass:
  """One top-level op touching big arrays: (class, dtype) of each read / write."""
  name: str
  op: str
  reads: list
  writes: list

  @property
  def bytes(self) -> int:
    return sum(b for _, _, b in self.reads + self.writes)

  def __str__(self):
    show = lambda a: ",".join(f"{c}:{d}" for c, d, _ in a) or "-"
    return f"{self.op:<12s} {self.name:<34s} reads {show(self.reads):<28s} writes {show(self.writes)}"


def _shapes(text: str):
  return [(d, tuple(int(v) for v in s.split(",") if v)) for d, s in _SHAPE.findall(text)]


def passes(hlo: str, classes: dict) -> list[Pass]:
  """The passes of an optimized HLO module's text (``compiled.as_text()``).

  ``classes`` maps a name to a shape, e.g. {"MK": (M, K)}, or to a list of
  shapes (the same tensor as [B, T, K] and [B*T, K]); an array whose sorted
  dims equal a class's sorted dims is of that class (so choose M, K, N
  distinct), any other array is ignored. Fused computations are skipped:
  their work is counted once, at the fusion op that calls them."""
  by_dims = {tuple(sorted(s)): c for c, ss in classes.items()
             for s in (ss if isinstance(ss, list) else [ss])}
  fused = set(re.findall(r"\bfusion\(.*?calls=%([\w.\-]+)", hlo))
  out, shapes, skip = [], {}, False
  for line in hlo.splitlines():
    head = re.match(r"(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)  # Unindented: a computation.
    if head:
      skip, shapes = head.group(2) in fused, {}
      continue
    m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)", line)
    if skip or not m:
      continue
    name, type_text, op, rest = m.groups()
    shapes[name] = _shapes(type_text)
    if op in _FREE:
      continue
    args = rest.split("),")[0] if op != "custom-call" else rest.split(")")[0]
    big = lambda arrs: [(by_dims[tuple(sorted(s))], d, _BYTES[d] * int(np.prod(s)))
                        for d, s in arrs if tuple(sorted(s)) in by_dims]
    reads = big([a for n in _NAME.findall(args) for a in shapes.get(n, [])])
    writes = big(shapes[name])
    if reads or writes:
      kind = re.search(r"kind=(\w+)", rest)
      label = "custom-call" if op == "custom-call" else (op if not kind else f"fusion:{kind.group(1)[1:]}")
      out.append(Pass(name, label, reads, writes))
  return out


def _stub_kernel(monkeypatch_targets):
  """Replaces the Mosaic GPU kernel by an opaque call of the same signature."""
  from qtrain.kernels import dispatch, int8_mosaic  # pylint: disable=g-import-not-at-top

  def call(xp, wp, s_x, s_w, out_dtype, b, interpret):
    del b, interpret
    out = jax.ShapeDtypeStruct((xp.shape[0], wp.shape[0]), out_dtype)
    args = (xp, wp) if s_x is None else (xp, wp, s_x, s_w)
    return jax.pure_callback(lambda *a: np.zeros(out.shape, out.dtype), out, *args)

  monkeypatch_targets.append((int8_mosaic, "call", int8_mosaic.call))
  monkeypatch_targets.append((dispatch, "flavour", dispatch.flavour))
  int8_mosaic.call = call
  dispatch.flavour = lambda kernels, op: None if kernels == "xla" else ("gpu", False)


def matmul_programs(m: int, k: int, n: int, kernels: str = "xla", hp_bwd: bool = False):
  """(forward HLO, backward HLO) of one w8a8 matmul (see the module doc)."""
  from qtrain.quant import dot_general as dg  # pylint: disable=g-import-not-at-top
  from qtrain.quant.spec import QuantSpec  # pylint: disable=g-import-not-at-top
  int8 = lambda g: QuantSpec(bits=8, format="int", granularity=g, calibration="absmax")
  spec = dg.DotSpec(weight=int8("channel"), act=int8("token"), mode="int8",
                    int8_backward=not hp_bwd, kernels=kernels)
  dims = (((1,), (0,)), ((), ()))
  mm = lambda x, w: dg.quant_dot(spec, None, None, x, w, dims)
  fwd = jax.jit(mm)
  bwd = jax.jit(lambda x, w, g: jax.vjp(mm, x, w)[1](g))
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((k, n), jnp.float32)
  g = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
  return fwd.lower(x, w).compile().as_text(), bwd.lower(x, w, g).compile().as_text()


def count(m: int, k: int, n: int, kernels: str, stub: bool, hp_bwd: bool = False) -> dict:
  """{"fwd": [Pass], "bwd": [Pass]} for one matmul."""
  restore = []
  if stub:
    _stub_kernel(restore)
  try:
    hlos = matmul_programs(m, k, n, kernels, hp_bwd)
  finally:
    for mod, attr, val in restore:
      setattr(mod, attr, val)
  classes = {"MK": (m, k), "MN": (m, n), "KN": (k, n)}
  return {"fwd": passes(hlos[0], classes), "bwd": passes(hlos[1], classes)}


# The custom calls an int8 kernel becomes: the CPU stand-in; Mosaic GPU's call.
_KERNEL_CALL = re.compile(r'custom_call_target="(xla_ffi_python_cpu_callback|mosaic_gpu[\w]*)"')


# The model of the step counts: tokens 2 x 320 (M = 640), d_model 128, 4
# heads of 64 (q, k, v: 256 wide), d_ff 384. Every dim is a whole Mosaic
# tile (no padding passes) and the widths differ, so an activation's class
# names it. Two scanned blocks: the forward and the backward are each one
# loop body (one block's work), which XLA would inline for one block.
STEP_MODEL = dict(n_layers=2, d_model=128, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=384)
STEP_TOKENS = (2, 320)


def step_hlo(kernels: str, policy: str, stub: bool, extra_policies: dict | None = None,
             dtype: str = "float32") -> str:
  """The compiled gradient (HLO text) of a one-block w8a8 smoke model under
  remat ``policy``; ``extra_policies`` are registered into
  ``decoder.REMAT_POLICIES`` for the call."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from qtrain.layers import decoder  # pylint: disable=g-import-not-at-top
  from qtrain.train.build import build_model  # pylint: disable=g-import-not-at-top
  restore = [(decoder.REMAT_POLICIES, name, decoder.REMAT_POLICIES.get(name))
             for name in (extra_policies or {})]
  decoder.REMAT_POLICIES.update(extra_policies or {})
  if stub:
    _stub_kernel(restore)
  try:
    c = default.get_config("smoke,w8a8")
    c.model.update(remat_policy=policy, dtype=dtype, **STEP_MODEL)
    c.quant.kernels = kernels
    model = build_model(c)
    tokens = jax.ShapeDtypeStruct(STEP_TOKENS, jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    f = lambda p, t: jnp.mean(model.apply({"params": p}, t).astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(f)).lower(params, tokens).compile().as_text()
  finally:
    for target, attr, val in restore:
      if isinstance(target, dict):
        target.pop(attr) if val is None else target.__setitem__(attr, val)
      else:
        setattr(target, attr, val)


def step_kernel_calls(kernels: str, policy: str, stub: bool, extra_policies: dict | None = None,
                      dtype: str = "float32") -> int:
  """Int8 kernel calls in ``step_hlo`` (a scanned block's forward and
  backward are each one loop body, so this is per block: 21 = 7 forward +
  14 backward, more where remat runs forward kernels again)."""
  return len(_KERNEL_CALL.findall(step_hlo(kernels, policy, stub, extra_policies, dtype)))


def step_code_passes(hlo: str) -> list[tuple[str, int, int]]:
  """(computation, int8 kernels, passes writing [M, *] int8 codes) for each
  computation of ``step_hlo`` that calls a kernel. Ideal per block: forward
  4 code passes for 7 kernels (q, k, v share the attention input's codes,
  gate and up the MLP input's); backward 18 for 14 (the 4 inputs' codes for
  dW, dY's two codes per matmul)."""
  m = STEP_TOKENS[0] * STEP_TOKENS[1]
  widths = {STEP_MODEL["d_model"], STEP_MODEL["n_heads"] * STEP_MODEL["head_dim"],
            STEP_MODEL["n_kv_heads"] * STEP_MODEL["head_dim"], STEP_MODEL["d_ff"]}
  classes = {f"M{w}": [(m, w), (*STEP_TOKENS, w)] for w in widths}
  out = []
  for comp in re.split(r"\n(?=(?:ENTRY )?%[\w.\-]+ \()", hlo):
    calls = len(_KERNEL_CALL.findall(comp))
    if calls:
      name = re.match(r"\s*(?:ENTRY )?%([\w.\-]+)", comp)
      codes = [p for p in passes("HloModule step\n" + comp, classes) if p.op != "custom-call"
               and any(d == "s8" for _, d, _ in p.writes)]
      out.append((name.group(1) if name else "?", calls, len(codes)))
  return out


def summary(counted: dict) -> str:
  lines = []
  for part, ps in counted.items():
    lines.append(f"  {part}: {len(ps)} passes, {sum(p.bytes for p in ps) / 2**20:.1f} MiB")
    lines += [f"    {p}" for p in ps]
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--m", type=int, default=4096)
  p.add_argument("--k", type=int, default=256)
  p.add_argument("--n", type=int, default=512)
  p.add_argument("--kernels", default="xla,auto")
  p.add_argument("--stub", type=int, default=int(jax.default_backend() != "gpu"))
  p.add_argument("--hp_bwd", action="store_true")
  p.add_argument("--step", action="store_true",
                 help="also count the int8 kernels of a one-block model's step per remat policy")
  args = p.parse_args()
  if args.step:
    # JAX's own policy, which cannot see a Pallas kernel's output as a dot,
    # beside qtrain's, which also keeps the outputs named SAVED_OUT.
    saved = {"jax_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    for policy in ("none", "jax_dots_no_batch", "dots_no_batch"):
      hlo = step_hlo("auto", policy, bool(args.stub), saved)
      print(f"int8 kernels per block, remat_policy={policy}: {len(_KERNEL_CALL.findall(hlo))}; "
            "(computation, kernels, int8 code passes): "
            + ", ".join(map(str, step_code_passes(hlo))))
  for kernels in args.kernels.split(","):
    stub = bool(args.stub) and kernels != "xla"
    c = count(args.m, args.k, args.n, kernels, stub, args.hp_bwd)
    total = sum(p.bytes for ps in c.values() for p in ps)
    print(f"kernels={kernels}{' (stub)' if stub else ''} M={args.m} K={args.k} N={args.n} "
          f"on {jax.default_backend()}: {sum(map(len, c.values()))} passes, "
          f"{total / 2**20:.1f} MiB")
    print(summary(c))


if __name__ == "__main__":
  main()
