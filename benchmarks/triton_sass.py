"""Read a Pallas Triton kernel's sm_90 build on a machine without a GPU.

Two steps, two Pythons (the project's venv has jax, not ``triton``):

  python benchmarks/triton_sass.py --dump=/tmp/ttir                 # project venv
  /path/to/python-with-triton benchmarks/triton_sass.py --compile=/tmp/ttir

``--dump`` lowers the W4A16 decode kernels (``int4_gemv`` at each of
``matmul_decode.GEMV_CONFIGS``, and v1 ``int4_matmul`` with the dispatcher's
decode blocks) for CUDA at ``--shapes`` and M = 16, 1, and writes the Triton
IR Pallas hands to XLA (captured from ``lower_jaxpr_to_triton_module``) as
``<name>.ttir`` with its launch options and the packed bytes each thread
reads per loop step in ``<name>.json``.

``--compile`` builds each ``.ttir`` with the ``triton`` wheel (3.9 here:
``pip install triton`` into any venv; it carries ptxas and cuobjdump) for
``GPUTarget("cuda", 90, 32)``, no device needed, and prints registers,
stack (spills), shared memory, and the SASS of the main loop (the longest
backward branch): its length per packed byte and its most frequent opcodes.
An H100 issues ~0.93 M warp-instructions per us (132 SMs x 4 x 1.755
GHz), so c instructions per packed byte over B bytes need at least
B c / 32 / 0.93e6 us: the issue floor beside the byte floor (B / 3.0e6
us at 3.0 TB/s). A program of one step has no loop: its whole kernel is
counted instead (marked *). Caveat: the GPU's
jaxlib bundles its own Triton build; its code may differ from the wheel's.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import re
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def dump(out_dir: str, shapes: str, configs: str | None) -> None:
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
  from benchmarks import matmul_decode as decode  # pylint: disable=g-import-not-at-top
  from qtrain.kernels import int4, int4_gemv  # pylint: disable=g-import-not-at-top

  captured = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*a, **kw):
    result = original(*a, **kw)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  os.makedirs(out_dir, exist_ok=True)
  s = jax.ShapeDtypeStruct
  group = 128
  for shape in shapes.split(","):
    k, n = map(int, shape.split("x"))
    for m in (16, 1):
      args = (s((m, k), jnp.bfloat16), s((k // 2, n), jnp.int8), s((k // group, n), jnp.float32))
      kernels = {}
      for spec in (configs or ";".join(decode.GEMV_CONFIGS)).split(";"):
        cfg = decode.gemv_config(spec)
        split = int4_gemv.split_for(m, k, -(-n // cfg.bn), k // (2 * group), cfg.split_k, cfg.per_sm)
        codes = (s((n // cfg.bn, k // 2, cfg.bn), jnp.int8) if spec.startswith(decode.TILED)
                 else args[1])
        kernels[f"gemv_{spec.replace(decode.TILED, 'tiled_').replace(',', '_')}"] = (
            functools.partial(int4_gemv.int4_gemv, group=group, config=cfg), cfg.num_warps,
            cfg.num_stages, group * cfg.bn / (32 * cfg.num_warps), split, codes)
      b = int4.GPU_DECODE_BLOCKS
      kernels["v1_decode_blocks"] = (functools.partial(int4.int4_matmul, group=group, blocks=b),
                                     b.num_warps, b.num_stages, group * b.n / (32 * b.num_warps),
                                     b.split_k, args[1])
      for name, (fn, warps, stages, bytes_per_thread, split, codes) in kernels.items():
        captured.clear()
        jax.jit(fn).trace(args[0], codes, args[2]).lower(lowering_platforms=("cuda",))
        stem = f"{out_dir}/{name}_K{k}_N{n}_M{m}"
        pathlib.Path(stem + ".ttir").write_text(captured[0])
        pathlib.Path(stem + ".json").write_text(json.dumps(dict(
            num_warps=warps, num_stages=stages, bytes_per_thread_step=bytes_per_thread,
            split=split, packed_bytes=k * n // 2)))
        print(stem + ".ttir", flush=True)


def _loop(sass: str):
  """(length, opcode counts, whole) of the longest backward branch's body,
  or of the whole kernel (whole=True) when it has no loop."""
  ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
  loops = []
  for addr, text in ins:
    m = re.search(r"BRA\s+(0x[0-9a-f]+)", text)
    if m and int(m.group(1), 16) < addr:
      loops.append((addr - int(m.group(1), 16), int(m.group(1), 16), addr))
  lo, hi = max(loops)[1:] if loops else (0, ins[-1][0])
  body = [t for a, t in ins if lo <= a <= hi]
  ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
  return len(body), ops, not loops


def compile_all(in_dir: str) -> None:
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
  print(f"triton {triton.__version__}, target sm_90; SASS per packed byte = main-loop "
        "instructions / packed bytes a thread reads per step")
  print(f"{'kernel':58s} {'split':>5s} {'regs':>4s} {'stack':>5s} {'smem':>6s} {'loop':>5s} "
        f"{'/byte':>5s} {'issue us':>8s}  top opcodes")
  for path in sorted(glob.glob(f"{in_dir}/*.ttir")):
    meta = json.loads(pathlib.Path(path[:-5] + ".json").read_text())
    name = os.path.basename(path)[:-5]
    try:
      kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=meta["num_warps"], num_stages=meta["num_stages"]))
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name:58s} FAILED {type(e).__name__}: {str(e)[:200]}")
      continue
    cubin = pathlib.Path(path[:-5] + ".cubin")
    cubin.write_bytes(kernel.asm["cubin"])
    run = lambda *a: subprocess.run([str(tools / "cuobjdump"), *a, str(cubin)], capture_output=True,
                                    text=True, check=True).stdout
    usage = run("--dump-resource-usage")
    regs, stack = (re.search(rf"{f}:(\d+)", usage).group(1) for f in ("REG", "STACK"))
    length, ops, whole = _loop(run("-sass"))
    per_byte = length / meta["bytes_per_thread_step"]
    issue_us = meta["packed_bytes"] * per_byte / 32 / 0.93e6  # 0.93 M warp-instructions per us.
    top = " ".join(f"{op}:{c}" for op, c in ops.most_common(8))
    print(f"{name:58s} {meta['split']:5d} {regs:>4s} {stack:>5s} {kernel.metadata.shared:6d} "
          f"{length:5d}{'*' if whole else ' '}{per_byte:5.1f} {issue_us:8.1f}  {top}")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--dump", help="write the kernels' Triton IR here (project venv)")
  p.add_argument("--compile", help="build each .ttir here for sm_90 (a venv with triton)")
  p.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096,2048x5632,5632x2048,2048x2048",
                 help="KxN weight shapes (llama_8b, llama_1b layers by default)")
  p.add_argument("--configs", default=None,
                 help="';'-separated --gemv_configs (matmul_decode.GEMV_CONFIGS by default)")
  args = p.parse_args()
  if bool(args.dump) == bool(args.compile):
    p.error("one of --dump or --compile")
  if args.dump:
    dump(args.dump, args.shapes, args.configs)
  else:
    compile_all(args.compile)


if __name__ == "__main__":
  main()
