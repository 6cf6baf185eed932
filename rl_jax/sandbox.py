"""Sandbox for model-generated Python: `run_python(code, stdin)` runs a program with limits and no way out.

Each run gets a fresh `tempfile.mkdtemp()` as its only writable place, a scrubbed environment (PATH, LANG), its
own process group and an isolated interpreter (`python -I -S`: no site-packages, no PYTHON* variables), with
RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE and RLIMIT_NOFILE set. Rlimits alone do not hold for root (no
process-count limit, write access everywhere), so the isolation is the strongest layer this machine allows, found
once per process by running a probe program under each in turn (`isolation_level()`):

  "namespaces"  new mount, PID, network, IPC and UTS namespaces (plus a user namespace when not root): every mount
                read-only except the program's directory (a size-limited tmpfs), a fresh /proc showing only the
                sandbox, an unconfigured network (127.0.0.1 is not the host's), and, when root, a throwaway uid with
                no account. The program's main process runs under a tiny init; when either dies the kernel kills
                every process of the namespace.
  "setuid"      (root without namespaces) a throwaway uid, so that RLIMIT_NPROC binds per run and root's files and
                processes are out of reach, plus the audit hook below; at exit every process of that uid is killed.
  "rlimits"     rlimits plus an audit hook in the child interpreter refusing sockets, subprocesses, fork, ctypes,
                writes outside its directory and other processes' /proc entries. Audit hooks are not a security
                boundary (Python's documentation says so): this layer only stops programs that are not trying.

Every layer sets PR_SET_NO_NEW_PRIVS and kills the whole process group at the deadline (wall clock) and as soon as
the main process exits; the first process of the sandbox enforces the deadline too, so a caller that dies (a killed
verifier worker) leaves no process behind. Output goes to unnamed files bounded by RLIMIT_FSIZE, never to pipes: no
stray child can hold the caller up. The caller only waits in `Popen.wait`, so a thread per run suffices for
parallelism (`SandboxPool`, `run_many`). `SandboxResult.isolation` says which layer ran.

This file is also the sandbox's first process: the caller runs it as a script (`python -I -S sandbox.py CONFIG`),
so it imports nothing outside the standard library.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

ISOLATIONS = ("namespaces", "setuid", "rlimits")
_SETUP_FAILED = 125  # exit status of a sandbox that could not set itself up (the program never ran)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """What one run did: exit status (negative: killed by that signal), its output, and the isolation used."""

  returncode: int
  stdout: str
  stderr: str
  timed_out: bool
  isolation: str


# ------------------------------------------------------- inside the sandbox

# The program runs from this: the fallback layers install the audit hook first, then main.py runs as __main__.
_RUNNER = r"""
import sys
def _guard(os=__import__("os")):
  root, me = os.path.realpath("."), str(os.getpid())
  deny = frozenset(("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.kill",
    "os.killpg", "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys._current_frames"))
  no_import = frozenset(("_ctypes", "ctypes", "_posixsubprocess", "subprocess", "_socket", "socket", "_ssl",
    "_multiprocessing", "multiprocessing", "pty"))
  # event -> (indices of paths it changes, index of its dir_fd or None)
  writes = {"os.rename": ((0, 1), 2), "os.link": ((0, 1), 2), "os.symlink": ((1,), 2), "os.remove": ((0,), 1),
    "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2), "os.chmod": ((0,), 2), "os.chown": ((0,), 3),
    "os.utime": ((0,), 3), "os.truncate": ((0,), None), "os.setxattr": ((0,), None),
    "os.removexattr": ((0,), None)}
  wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
  def inside(path, realpath=os.path.realpath, fsdecode=os.fsdecode):
    p = realpath(fsdecode(path))
    return p == root or p.startswith(root + "/") or p == "/dev/null"
  def foreign(path, realpath=os.path.realpath, fsdecode=os.fsdecode, isdir=os.path.isdir):
    p = realpath(fsdecode(path))  # another process's /proc entry, or a directory to open files relative to
    parts = p.split("/")
    return (len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != me) or (
      isdir(p) and not (p == root or p.startswith(root + "/")))
  def hook(event, args):
    if event in deny or (event == "import" and args[0].partition(".")[0] in no_import):
      raise PermissionError(f"sandbox: {event} {args[0] if event == 'import' else ''}".strip() + " is not allowed")
    if event == "open" and not isinstance(args[0], int):
      writing = any(c in (args[1] or "") for c in "wax+") or args[2] & wflags
      if (not inside(args[0])) if writing else foreign(args[0]):
        raise PermissionError(f"sandbox: opening {args[0]!r} is not allowed")
    elif event in writes:
      paths, dir_fd = writes[event]
      if (dir_fd is not None and args[dir_fd] not in (-1, None)) or not all(
        (isinstance(args[i], int) and event == "os.truncate") or (not isinstance(args[i], int) and inside(args[i]))
        for i in paths):
        raise PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed")
  sys.addaudithook(hook)
if sys.argv[1] == "1":
  _guard()
del _guard
sys.argv = ["main.py"]
with open("main.py", "rb") as _f:
  _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
"""

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
# Per-mount flags a read-only remount must keep (a user namespace may not clear them: they are locked).
_KEEP = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC}
_KEEP |= {"noatime": 1 << 10, "nodiratime": 1 << 11, "relatime": 1 << 21}
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


@functools.cache
def _libc() -> ctypes.CDLL:
  return ctypes.CDLL(None, use_errno=True)


def _call(name: str, *args) -> None:
  """A libc call that raises OSError on failure; str arguments go as bytes."""
  fn = getattr(_libc(), name)
  if fn(*(a.encode() if isinstance(a, str) else a for a in args)) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{name}{args[:2]}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
  _call("mount", source, target, fstype, flags, data)  # every flag used is below 2**31: a C int carries it


def _unescape(field: str) -> str:
  """A path from /proc/self/mountinfo, where space, tab, newline and backslash are written as \\ooo."""
  return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _remount_read_only(keep_writable: str) -> None:
  """Make every mount of this (private) mount namespace read-only, except `keep_writable`."""
  with open("/proc/self/mountinfo") as f:
    mounts = [(_unescape(x.split()[4]), x.split()[5].split(",")) for x in f]
  for point, options in mounts:
    if point == keep_writable:
      continue
    try:
      os.stat(point)
    except OSError:  # a mount we may not even look at (another user's FUSE): the program cannot either
      continue
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | sum(_KEEP.get(o, 0) for o in options)
    _mount(None, point, None, flags)


def _expose(path: str) -> None:
  """Let any user reach `path` in this mount namespace: each ancestor others may not search (e.g. /root, 0700,
  holding a pyenv interpreter) is covered by a tmpfs holding only the way on to `path`."""
  parts = path.strip("/").split("/")
  for i in range(1, len(parts)):
    ancestor, child = "/" + "/".join(parts[:i]), "/" + "/".join(parts[: i + 1])
    if os.stat(ancestor).st_mode & 0o001:
      continue
    fd = os.open(child, os.O_PATH)
    _mount("tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0711,size=16k")
    os.mkdir(child) if os.path.isdir(f"/proc/self/fd/{fd}") else open(child, "x").close()
    _mount(f"/proc/self/fd/{fd}", child, None, _MS_BIND | _MS_REC)
    os.close(fd)


def _hide(dirs: list[str]) -> None:
  """An empty tmpfs over each scratch directory (/tmp, /run, ...): their world-writable Unix sockets (dbus, X11)
  accept connections whatever the network namespace or a read-only mount say."""
  hidden: list[str] = []
  for d in sorted(dirs, key=len):
    if os.path.isdir(d) and os.path.realpath(d) == d and not any(d.startswith(h + "/") for h in hidden):
      _mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mode=0755,size=64k")
      hidden.append(d)


def _enter_namespaces(cfg: dict) -> None:
  """New namespaces for this process (its children get the new PID namespace); the program's directory becomes
  a tmpfs holding main.py, scratch directories are hidden, everything else is read-only."""
  root = os.geteuid() == 0
  uid, gid = os.getuid(), os.getgid()
  flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
  _call("unshare", flags if root else flags | _CLONE_NEWUSER)
  if not root:  # map only ourselves: the program's uid is not 0 in the namespace, so exec drops all capabilities
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
      with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
  _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates back to the host
  work = cfg["workdir"]
  with open(os.path.join(work, "main.py"), "rb") as f:
    code = f.read()
  _hide(cfg["scratch"])
  os.makedirs(work, exist_ok=True)  # under a hidden directory it is gone
  owner = cfg["uid"] if cfg["uid"] is not None else uid
  if cfg["uid"] is not None:  # the throwaway uid must reach the interpreter and its directory
    for path in (os.path.dirname(os.path.dirname(cfg["python"])), work):  # bin/.. holds lib/ too
      _expose(path)
  opts = f"size={cfg['disk_mb']}m,mode=0700,uid={owner},gid={owner if cfg['uid'] is not None else gid}"
  _mount("tmpfs", work, "tmpfs", _MS_NOSUID | _MS_NODEV, opts)
  with open(os.path.join(work, "main.py"), "wb") as f:
    f.write(code)
  _remount_read_only(keep_writable=work)


def _fresh_proc() -> None:
  """/proc of the new PID namespace (only the sandbox's processes); if refused, an empty /proc."""
  flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
  try:
    _mount("proc", "/proc", "proc", flags)
  except OSError:  # a user namespace may not mount a proc that would reveal more than the host's does
    _mount("tmpfs", "/proc", "tmpfs", flags, "size=4k")


def _exec_program(cfg: dict) -> None:
  """Become the program: limits, the throwaway uid, no new privileges, then exec the runner."""
  os.chdir(cfg["workdir"])
  cpu = int(cfg["timeout_s"]) + 1
  for res, value in (
    (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU, then SIGKILL: a backstop to the wall-clock deadline
    (resource.RLIMIT_AS, (cfg["memory_mb"] << 20,) * 2),
    (resource.RLIMIT_FSIZE, (cfg["disk_mb"] << 20,) * 2),
    (resource.RLIMIT_NOFILE, (64, 64)),
    (resource.RLIMIT_NPROC, (cfg["nproc"],) * 2),
    (resource.RLIMIT_CORE, (0, 0)),
  ):
    resource.setrlimit(res, value)
  _call("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can give root back
  if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
  hooked = "0" if cfg["isolation"] == "namespaces" else "1"
  env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
  os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-c", _RUNNER, hooked], env)


class _Deadline(Exception):
  pass


def _on_alarm(*_) -> None:
  raise _Deadline


def _supervise(pid: int, deadline: float) -> int:
  """Wait for `pid` until the (monotonic) deadline, then SIGKILL it; its exit code (negative: signal)."""
  signal.signal(signal.SIGALRM, _on_alarm)
  try:
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-3))
    _, status = os.waitpid(pid, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    return os.waitstatus_to_exitcode(status)
  except _Deadline:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


def _fork(child) -> int:
  """Fork; the child runs `child()` and never returns into the caller's code."""
  pid = os.fork()
  if pid == 0:
    try:
      child()
    except BaseException as e:
      os.write(2, f"sandbox setup failed: {e!r}\n".encode())
    os._exit(_SETUP_FAILED)
  return pid


def _init(cfg: dict, status_w: int) -> None:
  """PID 1 of the sandbox: run the program, pass its exit code on, exit (the kernel then kills the rest)."""
  _call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the first process gone: all gone
  _fresh_proc()
  code = _supervise(_fork(lambda: _exec_program(cfg)), cfg["deadline"])
  os.write(status_w, str(code).encode())
  os._exit(0)


def _kill_uid(uid: int) -> None:
  """SIGKILL every process of `uid` (a throwaway uid: they are all the program's, wherever they went)."""

  def killer():
    os.setuid(uid)
    os.kill(-1, signal.SIGKILL)  # kill(-1) spares the sender

  os.waitpid(_fork(killer), 0)


def _boot(cfg: dict) -> None:
  """The sandbox's first process: isolate, run the program, clean up, exit as the program did."""
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  try:
    if cfg["isolation"] == "namespaces":
      _enter_namespaces(cfg)
      status_r, status_w = os.pipe()
      init = _fork(lambda: _init(cfg, status_w))
      os.close(status_w)
      _supervise(init, cfg["deadline"] + 1.0)  # init enforces the deadline; this is a backstop
      text = os.read(status_r, 64).decode()
      code = int(text) if text else -signal.SIGKILL
    else:
      code = _supervise(_fork(lambda: _exec_program(cfg)), cfg["deadline"])
      if cfg["uid"] is not None:
        _kill_uid(cfg["uid"])
  except Exception as e:
    os.write(2, f"sandbox setup failed: {e!r}\n".encode())
    os._exit(_SETUP_FAILED)
  if code < 0:  # die of the program's signal, so the caller sees the same returncode as from a plain Popen
    if -code != signal.SIGKILL:
      signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
  os._exit(code if 0 <= code < 256 else _SETUP_FAILED)


# ----------------------------------------------------------------- the caller

PYTHON = os.path.realpath(sys.executable)  # the interpreter programs run under (found by realpath: no venv)
_GRACE_S = 0.5  # the caller's own kill, should the sandbox's first process not enforce the deadline itself
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_SCRATCH = ["/tmp", "/var/tmp", "/run", "/dev/shm", tempfile.gettempdir()]  # hidden under "namespaces"


def _throwaway_uid() -> int:
  """A uid no account uses (above the 2**20 that subordinate-id ranges usually start at), fresh for each run."""
  return (1 << 20) + int.from_bytes(os.urandom(4), "little") % (1 << 30)


def _user_processes() -> int:
  """How many processes this uid runs now (RLIMIT_NPROC counts them all, not only the sandbox's)."""
  count, uid = 0, f"Uid:\t{os.getuid()}\t"
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/status") as f:
        count += any(line.startswith(uid) for line in f)
    except OSError:
      pass
  return count


def _read(f, limit: int) -> str:
  f.seek(0)
  return f.read(limit).decode("utf-8", "replace")


def _launch(code: str, stdin: str, layer: str, timeout_s: float, memory_mb: int, disk_mb: int, nproc: int):
  """One run under `layer`; OSError only if the sandbox could not even be started."""
  root = os.geteuid() == 0
  uid = _throwaway_uid() if root and layer != "rlimits" else None
  workdir = tempfile.mkdtemp(prefix="rl_jax_sandbox_")
  try:
    with open(os.path.join(workdir, "main.py"), "wb") as f:
      f.write(code.encode("utf-8", "replace"))
    if uid is not None and layer == "setuid":
      os.chown(workdir, uid, uid)
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
      fin.write(stdin.encode("utf-8", "replace"))
      fin.seek(0)
      nproc = nproc if root else nproc + _user_processes()
      start = time.monotonic()
      cfg = dict(isolation=layer, workdir=workdir, uid=uid, python=PYTHON, scratch=_SCRATCH, deadline=start + timeout_s)
      cfg |= dict(timeout_s=timeout_s, memory_mb=memory_mb, disk_mb=disk_mb, nproc=nproc)
      argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)]
      proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir, env=_ENV, start_new_session=True)
      expired = False
      try:
        proc.wait(timeout_s + _GRACE_S)
      except subprocess.TimeoutExpired:
        expired = True
      finally:
        try:
          os.killpg(proc.pid, signal.SIGKILL)  # whatever the program left in its group
        except OSError:
          pass
      returncode = proc.wait()
      elapsed = time.monotonic() - start
      out, err = _read(fout, disk_mb << 20), _read(ferr, disk_mb << 20)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  timed_out = expired or returncode == -signal.SIGXCPU or (returncode < 0 and elapsed >= timeout_s)
  return SandboxResult(returncode, out, err, timed_out, layer)


_WORKS: dict[tuple[str, str], bool] = {}  # (layer, PYTHON) -> whether it runs a probe program here
_WORKS_LOCK = threading.Lock()


def layer_works(layer: str) -> bool:
  """Whether `layer` (one of ISOLATIONS) runs a probe program on this machine; probed once per process."""
  if layer == "setuid" and os.geteuid() != 0:
    return False
  with _WORKS_LOCK:
    if (layer, PYTHON) not in _WORKS:
      try:
        r = _launch("print('ok')", "", layer, 30.0, 512, 16, 16)
        _WORKS[layer, PYTHON] = r.returncode == 0 and r.stdout == "ok\n"
      except OSError:
        _WORKS[layer, PYTHON] = False
    return _WORKS[layer, PYTHON]


def isolation_level() -> str:
  """The strongest layer of ISOLATIONS that works here ("setuid" needs root)."""
  layers = ISOLATIONS if os.geteuid() == 0 else ("namespaces", "rlimits")
  if layer := next(filter(layer_works, layers), None):
    return layer
  raise RuntimeError(f"no sandbox layer of {layers} runs a program here")


def run_python(
  code: str,
  stdin: str = "",
  timeout_s: float = 5.0,
  memory_mb: int = 512,
  *,
  disk_mb: int = 16,
  max_processes: int = 16,
  isolation: str | None = None,
) -> SandboxResult:
  """Run `code` as a Python program on `stdin` in the sandbox; never raises on what the program does.

  timeout_s: wall clock (and, rounded up, CPU seconds); memory_mb: address space; disk_mb: size of any file it
  writes, its output included, and of its directory; max_processes: processes (and threads) it may run at once,
  each with its own memory_mb, so max_processes * memory_mb bounds its memory; isolation: one of ISOLATIONS,
  default the strongest that works here (`isolation_level()`).
  """
  if not isinstance(code, str) or not isinstance(stdin, str):
    raise ValueError(f"code and stdin must be str, got {type(code).__name__} and {type(stdin).__name__}")
  if not timeout_s > 0 or memory_mb < 32 or disk_mb < 1 or max_processes < 1:
    raise ValueError(
      f"need timeout_s > 0, memory_mb >= 32, disk_mb >= 1, max_processes >= 1; got {timeout_s}, {memory_mb}, "
      f"{disk_mb}, {max_processes}"
    )
  if isolation is not None and isolation not in ISOLATIONS:
    raise ValueError(f"unknown isolation {isolation!r}; expected one of {ISOLATIONS}")
  if isolation == "setuid" and os.geteuid() != 0:
    raise ValueError("isolation 'setuid' needs root")
  layer = isolation or isolation_level()
  try:
    return _launch(code, stdin, layer, timeout_s, memory_mb, disk_mb, max_processes)
  except OSError as e:  # no process or disk left: a failed run, not the caller's problem
    return SandboxResult(-1, "", f"sandbox did not start: {e}", False, layer)


class SandboxPool:
  """Up to `workers` sandboxed runs at once, each waited on by a thread (the work is in the subprocesses), so
  submitting returns at once and the trainer keeps going."""

  def __init__(self, workers: int | None = None):
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
      raise ValueError(f"SandboxPool needs at least one worker, got {workers}")
    self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sandbox")

  def submit(self, code: str, stdin: str = "", **limits) -> concurrent.futures.Future:
    """A future of `run_python(code, stdin, **limits)`."""
    return self._executor.submit(run_python, code, stdin, **limits)

  def map(self, programs: Sequence[tuple[str, str]], **limits) -> list[SandboxResult]:
    """`run_python` of each (code, stdin), in order."""
    return [f.result() for f in [self.submit(code, stdin, **limits) for code, stdin in programs]]

  def close(self) -> None:
    self._executor.shutdown(wait=True)

  def __enter__(self) -> SandboxPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def run_many(programs: Sequence[tuple[str, str]], *, workers: int | None = None, **limits) -> list[SandboxResult]:
  """`run_python` of each (code, stdin), up to `workers` (default: CPU count) at once, in order."""
  with SandboxPool(workers) as pool:
    return pool.map(programs, **limits)


if __name__ == "__main__":
  _boot(json.loads(sys.argv[1]))
