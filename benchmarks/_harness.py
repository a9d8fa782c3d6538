"""The parent side of the benchmarks: run one measured process, summarise runs, print a table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stamp(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_child(cmd: list[str], out_json: Path, log_path: Path, env: dict | None = None) -> dict:
    """Run one measured process (output to log_path); its figures (BENCH_OUT) plus wall_s and peak_rss_mib."""
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_OUT": str(out_json), **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), child_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out_json.unlink(missing_ok=True)
    start = time.time()
    child_env["BENCH_T0"] = repr(start)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=HERE.parent)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS
    wall = time.time() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not out_json.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"{' '.join(map(str, cmd))} failed (exit {code}); the end of {log_path}:\n{tail}")
    figures = json.loads(out_json.read_text())
    figures.update(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024)  # Linux reports KiB
    return figures


def medians(results: dict[str, list[dict]], keys: list[str]) -> dict:
    return {side: {k: statistics.median(r[k] for r in runs) if all(r.get(k) is not None for r in runs) else None
                   for k in keys} for side, runs in results.items()}


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average": [round(x, 2) for x in os.getloadavg()],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def table(rows: list[tuple], med: dict, runs: dict) -> str:
    """Markdown: one line per (key, label, format) with each side's median, ours / TRL, and every run."""
    both = "ours" in med and "trl" in med
    lines = ["| measurement | ours (median) | TRL SFTTrainer (median) | ours / TRL | runs, ours | runs, TRL |",
             "| --- | --- | --- | --- | --- | --- |"]

    def show(fmt, value):
        return "-" if value is None else fmt.format(value)

    for key, label, fmt in rows:
        cells = [show(fmt, med[s][key]) if s in med else "-" for s in ("ours", "trl")]
        ratio = (f"{med['ours'][key] / med['trl'][key]:.2f}x"
                 if both and med["trl"][key] and med["ours"][key] is not None else "-")
        each = [", ".join(show(fmt, r.get(key)) for r in runs[s]) if s in runs else "-" for s in ("ours", "trl")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} | {each[0]} | {each[1]} |")
    return "\n".join(lines)
