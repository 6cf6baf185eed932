"""The package as users get it: ours never collides with a user's own `models`/`sharding` packages, and a plain
(non-editable) install carries the shipped configs and runs `rl-jax` from any directory."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from rl_jax import config as C
from rl_jax.models.config import preset

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return {**env, "JAX_PLATFORMS": "cpu", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _run(argv, cwd, env, timeout=120) -> subprocess.CompletedProcess:
  proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{argv[:4]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


def test_own_models_and_sharding_packages_do_not_shadow_ours(tmp_path):
  for name in ("models", "sharding"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(f"MARKER = 'theirs: {name}'\n")
  code = """
import json, sys
import models, sharding
import rl_jax.models, rl_jax.sharding
from rl_jax.config import load_run_config, model_config
from rl_jax.models.config import ModelConfig
cfg = model_config(load_run_config("pretrain_tiny"))  # config code imports only the rl_jax.* packages
print(json.dumps({
  "theirs": [models.MARKER, sharding.MARKER, models.__file__],
  "ours": [rl_jax.models.__file__, rl_jax.sharding.__file__, hasattr(rl_jax.models, "ModelConfig")],
  "hidden": cfg.hidden_size, "is_model_config": isinstance(cfg, ModelConfig),
}))
"""
  # The user's folder is the cwd and first on sys.path; the repo (if rl_jax is not installed) comes last.
  env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
  out = json.loads(_run([sys.executable, "-c", code], tmp_path, env).stdout.strip().splitlines()[-1])
  assert out["theirs"][:2] == ["theirs: models", "theirs: sharding"]
  assert Path(out["theirs"][2]).parent == tmp_path / "models"
  for f in out["ours"][:2]:
    assert tmp_path not in Path(f).parents, f
  assert out["ours"][2] and out["is_model_config"]
  assert out["hidden"] == preset("tiny-moe").hidden_size


def test_plain_install_runs_from_another_directory(tmp_path):
  # Build from a copy, so the wheel build writes nothing (build/, *.egg-info) into the repo.
  src = tmp_path / "src"
  junk = (".venv", ".git", "runs", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".ruff_cache")
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*junk))
  # A fresh venv without pip; the dependencies (jax, flax, ...) come from this interpreter's site-packages
  # through a plain-path .pth, which does not run this venv's editable-install finder.
  fresh = tmp_path / "fresh"
  env = _env()
  _run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], tmp_path, env)
  py = str(fresh / "bin" / "python")
  purelib = Path(
    _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip()
  )
  (purelib / "_rl_jax_test_deps.pth").write_text("\n".join(dict.fromkeys(site.getsitepackages())) + "\n")
  pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
  _run([*pip, "--target", str(purelib), str(src)], tmp_path, env, timeout=300)

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  out = _run([py, "-m", "rl_jax.cli", "init", "--model", "tiny-moe", "--out", "ckpt"], elsewhere, env).stdout
  assert "wrote checkpoint ckpt" in out
  written = json.loads((elsewhere / "ckpt" / "model_config.json").read_text())
  assert written == json.loads(json.dumps(C.to_dict(preset("tiny-moe"))))

  code = """
import json, rl_jax, rl_jax.models.config as mc
from rl_jax.config import load_run_config
from rl_jax import pipeline
quick = pipeline.load("pipelines/r1_zero_tiny")  # the main job's pipeline and every stage config it names
stages = {s.name: load_run_config(s.config).train.steps for s in quick.stages if s.config}
print(json.dumps({"rl_jax": rl_jax.__file__, "models": mc.__file__, "presets": [str(p) for p in mc.PRESET_DIR.glob("*.yaml")],
                  "steps": load_run_config("pretrain_tiny").train.steps, "quickstart": stages}))
"""
  info = json.loads(_run([py, "-c", code], elsewhere, env).stdout.strip().splitlines()[-1])
  for key in ("rl_jax", "models"):
    assert Path(info[key]).is_relative_to(purelib), info[key]
  want = sorted(p.name for p in (REPO / "configs" / "models").glob("*.yaml"))
  assert sorted(Path(p).name for p in info["presets"]) == want and "tiny-moe.yaml" in want
  assert all(Path(p).is_relative_to(purelib / "rl_jax" / "configs") for p in info["presets"])
  assert info["steps"] == C.load_run_config(REPO / "configs" / "pretrain_tiny.yaml").train.steps
  assert not (purelib / "models").exists() and not (purelib / "sharding").exists()  # nothing at top level
  assert set(info["quickstart"]) == {"base", "rl"} and min(info["quickstart"].values()) > 0
