"""One child process per benchmark variant: each starts with a fresh device,
so peak memory is its own and an out-of-memory variant fails alone.

A driver re-runs its own script with ``--variant=NAME`` (plus its own
arguments); the child prints its result as one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory")


def failure(name: str, proc: subprocess.CompletedProcess) -> dict:
  """A failed child's row: the out-of-memory line of its stderr if there is
  one, else its last line (the exception)."""
  # JAX ends a filtered traceback with a note and a rule after the exception.
  boiler = ("For simplicity, JAX has removed", "-" * 20)
  lines = [l for l in (proc.stderr or "").splitlines()
           if l.strip() and not l.startswith(boiler)]
  oom = next((l for l in reversed(lines) if any(m in l for m in OOM_MARKERS)), None)
  cause = oom or (lines[-1] if lines else f"exit status {proc.returncode}")
  return {"variant": name, "rc": proc.returncode, "oom": oom is not None, "error": cause[:500]}


def spawn(script: str, name: str, *, mem_fraction: float, timeout_s: float,
          extra=()) -> dict:
  """Runs ``script`` (this process's arguments) with ``--variant=name`` in a
  fresh process; its JSON row with ``wall_s``, or what failed."""
  cmd = [sys.executable, os.fspath(script), *sys.argv[1:], f"--variant={name}", *extra]
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(mem_fraction))
  t0 = time.time()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"variant": name, "oom": False,
            "error": f"timed out after {timeout_s} s (--child_timeout_s)"}
  row = next((json.loads(l) for l in reversed(proc.stdout.strip().splitlines())
              if l.startswith("{")), None)
  if row is None:
    row = failure(name, proc)
    sys.stderr.write(f"--- {name} failed; the end of its stderr:\n"
                     + "\n".join((proc.stderr or "").splitlines()[-15:]) + "\n")
  row["wall_s"] = round(time.time() - t0, 1)
  return row


def ratio(a, b):
  """a / b, or None when either is missing."""
  return None if a is None or not b else a / b


def finish_row(row: dict, device, losses) -> dict:
  """``row`` with the device's peak memory (None where it keeps no stats) and
  whether every timed loss was finite; printed as the child's JSON line."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  row["peak_bytes"] = (device.memory_stats() or {}).get("peak_bytes_in_use")
  row["finite"] = bool(np.isfinite(losses).all())
  print(json.dumps(row), flush=True)
  return row


def run_all(script: str, names, args, report) -> list[dict]:
  """Each variant of ``names`` in its own process, in order; prints the rows
  and ``report(rows)``, and writes both to ``args.out`` (JSON) when set."""
  start, rows = time.time(), []
  for name in names:
    rows.append(spawn(script, name, mem_fraction=args.mem_fraction,
                      timeout_s=args.child_timeout_s))
    print(f"[{time.time() - start:5.0f} s] {name}: {rows[-1].get('error', 'ok')}", flush=True)
  text = report(rows)
  for r in rows:
    print(json.dumps(r))
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "report": text, "argv": sys.argv[1:],
                 "wall_s": round(time.time() - start, 1)}, f, indent=1)
  return rows
