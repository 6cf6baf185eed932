"""The tables `rl-jax plan` prints (rl_jax/plan.py's result, and --search's ranking of rl_jax/plan_search.py)."""

from __future__ import annotations

GiB = 2**30


def _size(x: float) -> str:
  return f"{x / GiB:.2f} GiB" if abs(x) >= GiB / 10 else f"{x / 2**20:.1f} MiB"


def format_plan(p: dict) -> str:
  """The plan as the table `rl-jax plan` prints."""
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
  where = p["topology"] + (f" x {p['slices']} slices" if p["slices"] > 1 else "")
  lines = [
    f"{p['stage']} on {where}: {p['devices']} devices ({p['chip']['name']}, {_size(p['hbm_bytes'])} HBM each), "
    f"mesh {mesh}",
    "| program | calls | arguments | temporaries | outputs | aliased | also resident | total / chip | fits "
    "| TFLOP / chip | HBM GB / chip | bound s (by) | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in p["programs"]:
    b = r["bytes"]
    flops = f"{r['flops'] / 1e12:.3g}" if "flops" in r else "-"
    acc = f"{r['hbm_bytes_accessed'] / 1e9:.3g}" if "flops" in r else "-"
    bound = f"{r['bound_s']:.3g} ({r['limited_by']})" if "bound_s" in r else "-"
    lines.append(
      f"| {r['program']} | {r['calls']:g} | {_size(b['arguments'])} | {_size(b['temporaries'])} | {_size(b['outputs'])}"
      f" | {_size(b['aliased'])} | {_size(b['resident'])} | {_size(b['total'])} | {'yes' if r['fits'] else 'NO'}"
      f" | {flops} | {acc} | {bound} | {r['compile_s']:.1f} |"
    )
  if p.get("state_per_device"):
    parts = ", ".join(f"{k} {_size(v)}" for k, v in p["state_per_device"].items())
    lines.append(f"training state per chip (unpadded): {parts}")
  verdict = "fits" if p["fits"] else f"does NOT fit (peak {_size(p['per_device_bytes']['total'])})"
  lines.append(f"verdict: {verdict} in {_size(p['hbm_bytes'])} a chip; peak program {p['peak_program']}")
  if p["step_time_lower_bound_s"] is not None:
    mfu = p["mfu_upper_bound"]
    c = p["chip"]
    lines.append(
      f"step-time lower bound: {p['step_time_lower_bound_s']:.4g} s, MFU at most {100 * mfu:.1f}% (a bound: per call the "
      f"most of compute at {c['peak_bf16_flops'] / 1e12:.0f} TFLOP/s, bytes touched at {c['hbm_bandwidth'] / 1e9:.0f} GB/s "
      f"HBM, collectives at {c['ici_bandwidth'] / 1e9:.0f} GB/s ICI)"
    )
  coll = ", ".join(f"{k} {c['count']} x = {_size(c['bytes'])}" for k, c in p["collectives"].items()) or "none"
  lines.append(f"collectives per step and chip: {coll}")
  for r in p["programs"]:
    if not r["fits"] and "error" in r:
      lines.append(f"{r['program']}: {r['error']}")
  lines.append(f"compile time: {p['compile_s']:.1f} s")
  return "\n".join(lines)


def format_search(best: dict) -> str:
  lines = [
    f"search: {best['candidates_considered']} candidate(s) estimated to fit; compiled {len(best['search'])}, "
    "fastest bound first",
    "| candidate | estimated / chip | compiled total / chip | fits | bound s | MFU bound | compile s |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in best["search"]:
    bound, mfu = r["step_time_lower_bound_s"], r["mfu_upper_bound"]
    lines.append(
      f"| {r['candidate']} | {r['est_bytes'] / GiB:.1f} GiB | {r['per_device_bytes']['total'] / GiB:.1f} GiB"
      f" | {'yes' if r['fits'] else 'NO'} | {'-' if bound is None else f'{bound:.4g}'}"
      f" | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | {r['compile_s']:.0f} |"
    )
  return "\n".join(lines) + "\n\nbest:\n" + format_plan(best)
