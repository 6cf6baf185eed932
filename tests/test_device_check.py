"""benchmarks/device_check.sh and its helper, without a GPU: the shell script parses, the helper byte-compiles, and
on this CPU machine both stop before any part runs with one 'no GPU' line and exit status 2."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "device_check.sh")
HELPER = os.path.join(REPO, "benchmarks", "device_check.py")


def test_shell_script_parses():
  subprocess.run(["bash", "-n", SCRIPT], check=True, capture_output=True, timeout=30)


def test_helper_compiles(tmp_path):
  py_compile.compile(HELPER, cfile=str(tmp_path / "device_check.pyc"), doraise=True)


def test_no_gpu_is_one_line_and_exit_2(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}  # no GPU here, whatever plugins are installed
  out_py, out_sh = tmp_path / "py", tmp_path / "sh"
  procs = {  # both at once: the helper as is, and the script that runs it with the given python
    "py": subprocess.Popen(
      [sys.executable, HELPER, "--out", str(out_py)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ),
    "sh": subprocess.Popen(
      ["bash", SCRIPT], env={**env, "OUT": str(out_sh), "PYTHON": sys.executable},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ),
  }  # fmt: skip
  res = {k: (p.communicate(timeout=60)[0].decode(), p.returncode) for k, p in procs.items()}
  for name, (text, rc) in res.items():
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert rc == 2, f"{name}: exit status {rc}, output:\n{text}"
    assert len(lines) == 1 and lines[0].startswith("device_check: no GPU: "), f"{name}: output:\n{text}"
    assert "'cpu'" in lines[0], lines[0]
  assert not (out_py / "results.jsonl").exists()  # stopped before any part (model work) ran
  assert (out_sh / "log.txt").read_text().strip() == res["sh"][0].strip()
