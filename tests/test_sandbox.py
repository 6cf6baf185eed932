"""Sandbox: six adversarial programs (infinite loop, fork flood, huge allocation, writes outside its directory, a
connection to the host's 127.0.0.1, the parent's secrets) contained under every isolation layer that works here,
each returning within its deadline plus a second; ordinary programs run right; the pool runs them in parallel;
code_reward's table."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from rl_jax import rewards as R
from rl_jax import sandbox as S

T = 2.0  # deadline of the adversarial runs (a containment bound, not a speed benchmark)
MARK = b"_guard()"  # in the command line of every sandboxed program (the runner), and of nothing else


@pytest.fixture(params=S.ISOLATIONS)
def layer(request, monkeypatch):
  """Each isolation layer that runs here; "setuid" (root only) needs an interpreter any user may run, so a root
  whose Python lives under /root (0700) tries the system one."""
  name = request.param
  if name == "setuid" and os.geteuid() != 0:
    pytest.skip("setuid isolation needs root")
  if not S.layer_works(name) and name == "setuid" and os.path.exists("/usr/bin/python3"):
    monkeypatch.setattr(S, "PYTHON", os.path.realpath("/usr/bin/python3"))
  if not S.layer_works(name):
    pytest.skip(f"isolation {name!r} does not work on this machine")
  return name


def _sandboxed_pids() -> list[str]:
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        pids += [pid] if MARK in f.read() else []
    except OSError:
      pass
  return pids


def _run(code: str, layer: str, **limits) -> S.SandboxResult:
  """run_python under `layer`, asserting it returned within the deadline plus a second and left no process."""
  start = time.monotonic()
  r = S.run_python(code, timeout_s=T, isolation=layer, **limits)
  elapsed = time.monotonic() - start
  assert elapsed < T + 1.0, f"returned after {elapsed:.2f} s, deadline {T} s"
  assert r.isolation == layer
  for _ in range(20):  # SIGKILLed processes may take a moment to leave /proc
    if not _sandboxed_pids():
      break
    time.sleep(0.05)
  assert not _sandboxed_pids(), "sandboxed processes outlived the run"
  return r


# ------------------------------------------------------------ adversarial


def test_infinite_loop(layer):
  r = _run("while True:\n  pass", layer)
  assert r.timed_out and r.returncode != 0


def test_fork_flood(layer):
  code = """import os, time
n = 0
for _ in range(300):  # bounded, should containment fail
  try:
    if os.fork() == 0:
      os.setsid()  # out of the process group: only the namespace or the uid can still reach it
      time.sleep(20)
      os._exit(0)
    n += 1
  except Exception as e:
    print("refused:", e)
    break
print("forked", n)
"""
  r = _run(code, layer, max_processes=16)
  forked = int(r.stdout.split("forked ")[1])
  assert forked < 16 and "refused" in r.stdout, r.stdout + r.stderr  # the per-run limit binds, as root too
  assert not r.timed_out  # the run ended with its main process, live children or not
  assert subprocess.run(["true"]).returncode == 0  # the caller can still start processes


def test_huge_allocation(layer):
  r = _run("x = bytearray(8 << 30)\nprint(len(x))", layer, memory_mb=256)
  assert r.returncode != 0 and not r.timed_out and "MemoryError" in r.stderr, r.stderr


def test_write_outside(layer):
  victim_dir = tempfile.mkdtemp()
  victim, escape = os.path.join(victim_dir, "victim.txt"), f"/etc/rl_jax_sandbox_escape_{secrets.token_hex(4)}"
  try:
    os.chmod(victim_dir, 0o777)  # writable by anyone: only the sandbox stands in the way
    with open(victim, "w") as f:
      f.write("original")
    os.chmod(victim, 0o666)
    code = f"""import os
for attempt in ("open({victim!r}, 'w').write('pwned')", "open({victim!r}, 'a').write('pwned')",
                "os.remove({victim!r})", "open({victim_dir!r} + '/new', 'w').write('x')",
                "open({escape!r}, 'w').write('x')", "os.mkdir('/var/tmp/rl_jax_sandbox_escape')"):
  try:
    exec(attempt)
    print("done:", attempt)
  except Exception as e:
    print("refused:", type(e).__name__)
open("mine.txt", "w").write("inside")
print(open("mine.txt").read())
"""
    r = _run(code, layer)
    assert "done:" not in r.stdout and r.stdout.endswith("inside\n"), r.stdout + r.stderr
    with open(victim) as f:
      assert f.read() == "original"
    assert os.listdir(victim_dir) == ["victim.txt"]
    assert not os.path.exists(escape) and not os.path.exists("/var/tmp/rl_jax_sandbox_escape")
  finally:
    shutil.rmtree(victim_dir, ignore_errors=True)
    for path in (escape, "/var/tmp/rl_jax_sandbox_escape"):
      if os.path.isdir(path):
        os.rmdir(path)
      elif os.path.exists(path):
        os.remove(path)


def test_network(layer):
  sock_dir = tempfile.mkdtemp()
  tcp, unix = socket.socket(), socket.socket(socket.AF_UNIX)
  try:
    tcp.bind(("127.0.0.1", 0))
    unix.bind(os.path.join(sock_dir, "s"))
    os.chmod(sock_dir, 0o777)
    os.chmod(os.path.join(sock_dir, "s"), 0o777)  # a world-writable socket, like dbus's or X11's
    for s in (tcp, unix):
      s.listen()
      s.setblocking(False)
    code = f"""import socket
for family, address in ((socket.AF_INET, ("127.0.0.1", {tcp.getsockname()[1]})), (socket.AF_UNIX, {unix.getsockname()!r})):
  try:
    socket.socket(family).connect(address)
    print("connected", address)
  except Exception as e:
    print("refused:", e)
"""
    r = _run(code, layer)
    assert "connected" not in r.stdout, r.stdout
    for s in (tcp, unix):
      with pytest.raises(BlockingIOError):
        s.accept()
  finally:
    tcp.close()
    unix.close()
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_secrets(layer, monkeypatch):
  token = secrets.token_hex(16)
  monkeypatch.setenv("RL_JAX_TEST_SECRET", token)
  code = f"""import os
print(dict(os.environ))
for pid in ["{os.getpid()}", "{os.getppid()}"] + os.listdir("/proc"):
  try:
    print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
  except Exception as e:
    print(pid, "refused:", type(e).__name__)
"""
  r = _run(code, layer)
  assert "PATH" in r.stdout  # it ran
  assert token not in r.stdout + r.stderr


def test_namespaces_show_only_the_sandbox():
  """Under "namespaces" the program sees its own PID namespace in /proc (init is 1, it is 2) and, as root, runs as
  a uid other than 0."""
  if not S.layer_works("namespaces"):
    pytest.skip("no namespaces here")
  code = "import os\nprint(os.getpid(), os.getuid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
  pid, uid, pids = _run(code, "namespaces").stdout.split(" ", 2)
  assert (pid, pids.strip()) == ("2", "[1, 2]")
  if os.geteuid() == 0:
    assert int(uid) != 0  # a throwaway uid


# ------------------------------------------------------- ordinary programs

PROGRAMS = [
  # (name, code, stdin, returncode, stdout, text in stderr)
  ("echo-stdin", "import sys\nprint(sys.stdin.read().upper(), end='')", "hello\nworld\n", 0, "HELLO\nWORLD\n", ""),
  ("exit-code", "import sys\nprint('x')\nsys.exit(3)", "", 3, "x\n", ""),
  ("stderr", "import sys\nprint('oops', file=sys.stderr)", "", 0, "", "oops"),
  ("exception", "print('before')\n1 / 0", "", 1, "before\n", "ZeroDivisionError"),
  ("signal", "import os\nos.abort()", "", -6, "", ""),
  ("syntax-error", "def f(:\n  pass", "", 1, "", "SyntaxError"),
  ("own-files", "open('a.txt', 'w').write('kept')\nprint(open('a.txt').read())", "", 0, "kept\n", ""),
  (
    "stdlib",
    "import collections, json, math\nprint(json.dumps(collections.Counter('aab')), math.comb(5, 2))",
    "",
    0,
    '{"a": 2, "b": 1} 10\n',
    "",
  ),
  ("unicode", "print(input()[::-1])", "héllo ☃\n", 0, "☃ olléh\n", ""),
  ("dunder-main", "if __name__ == '__main__':\n  print('main')", "", 0, "main\n", ""),
]


@pytest.mark.parametrize("name,code,stdin,returncode,stdout,err", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_programs(name, code, stdin, returncode, stdout, err):
  r = S.run_python(code, stdin, timeout_s=10)
  assert (r.returncode, r.stdout, r.timed_out) == (returncode, stdout, False), r.stderr
  assert err in r.stderr and r.isolation == S.isolation_level()


def test_bad_arguments():
  for kwargs in ({"timeout_s": 0}, {"memory_mb": 1}, {"isolation": "chroot"}, {"max_processes": 0}):
    with pytest.raises(ValueError):
      S.run_python("print(1)", **kwargs)
  with pytest.raises(ValueError):
    S.run_python(None)
  with pytest.raises(ValueError):
    S.SandboxPool(workers=0)


def test_pool_runs_in_parallel():
  """Every sleeper's interval overlaps every other's (CLOCK_MONOTONIC is system-wide); a broken program among
  them costs only its own result; submitting does not wait for the run."""
  sleeper = "import time, sys\nt0 = time.monotonic()\ntime.sleep(2.0)\nprint(sys.stdin.read(), t0, time.monotonic())"
  programs = [(sleeper, str(i)) for i in range(6)] + [("def (:", "")]
  with S.SandboxPool(workers=len(programs)) as pool:
    future = pool.submit(sleeper, "x", timeout_s=10)
    assert not future.done()
    results = pool.map(programs, timeout_s=10)
    assert future.result().returncode == 0
  assert [r.stdout.split()[0] for r in results[:6]] == [str(i) for i in range(6)]
  spans = [tuple(map(float, r.stdout.split()[1:])) for r in results[:6]]
  assert max(s for s, _ in spans) < min(e for _, e in spans)
  assert results[6].returncode == 1 and "SyntaxError" in results[6].stderr
  assert [r.stdout for r in S.run_many([("print(1)", ""), ("print(2)", "")], workers=2)] == ["1\n", "2\n"]


# ------------------------------------------------------------ code reward

ADD = "a, b = map(int, input().split())\nprint(a + b)"
TESTS = [{"input": "1 2\n", "output": "3"}, {"input": "5 7", "output": "12\n"}]
SECRET_ANSWERS = os.path.join(tempfile.gettempdir(), "rl_jax_test_sandbox_answers.txt")


def _fence(code: str) -> str:
  return f"<think>sum</think><answer>\n```python\n{code}\n```\n</answer>"


CODE_CASES = [
  # (name, completion, tests, expected)
  ("correct", _fence(ADD), TESTS, 1.0),
  ("half", _fence("a, b = map(int, input().split())\nprint(a + b if a < 5 else a * b)"), TESTS, 0.5),
  ("wrong-output", _fence("print(0)"), TESTS, 0.0),
  ("syntax-error", _fence("print(("), TESTS, 0.0),
  ("infinite-loop", _fence("while True:\n  pass"), TESTS, 0.0),
  ("right-output-then-crash", _fence(ADD + "\n1 / 0"), TESTS, 0.0),
  ("reads-answers-outside", _fence(f"print(open({SECRET_ANSWERS!r}).read().split()[int(input()[0]) > 1])"), TESTS, 0.0),
  ("answer-block-no-fence", f"<answer>{ADD}</answer>", TESTS, 1.0),
  ("last-fence-wins", "```python\nprint(0)\n```\n" + _fence(ADD), TESTS, 1.0),
  ("py-fence", f"```py\n{ADD}\n```", TESTS, 1.0),
  ("no-program", "the answer is 3", TESTS, 0.0),
  ("no-tests", _fence(ADD), [], 0.0),
  ("malformed-tests", _fence(ADD), [{"in": "1 2"}], 0.0),
  ("not-a-string", None, TESTS, 0.0),
]


@pytest.mark.parametrize("name,completion,tests,expected", CODE_CASES, ids=[c[0] for c in CODE_CASES])
def test_code_reward(name, completion, tests, expected):
  if name == "reads-answers-outside":
    if S.isolation_level() == "rlimits":
      pytest.skip("the rlimits layer does not stop reads")
    with open(SECRET_ANSWERS, "w") as f:
      f.write("3 12")
    os.chmod(SECRET_ANSWERS, 0o600)
  try:
    assert R.code_reward(completion, tests, timeout_s=1.0) == expected
  finally:
    if os.path.exists(SECRET_ANSWERS):
      os.remove(SECRET_ANSWERS)


def test_accuracy_reward_code_kind():
  assert "code" in R.ACCURACY_KINDS
  assert R.accuracy_reward(_fence(ADD), {"kind": "code", "tests": TESTS}) == 1.0
  assert R.accuracy_reward(_fence("print(3)"), {"kind": "code", "tests": TESTS, "timeout_s": 1.0}) == 0.5


def test_score_batch_runs_code_in_verifier_workers():
  """The verifier pool's worker processes start sandboxes themselves; a looping program costs only its own score."""
  completions = [_fence(ADD), _fence("while True:\n  pass")]
  with R.VerifierPool(workers=1) as pool:
    total, parts = R.score_batch(completions, [{"kind": "code", "tests": TESTS}] * 2, R.RewardSpec(), pool=pool)
  assert parts["accuracy"].tolist() == [1.0, 0.0] and parts["format"].tolist() == [1.0, 1.0]
