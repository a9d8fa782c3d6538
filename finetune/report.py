"""report.html: a run seen at a glance, rebuilt from the run folder's files alone.

Summary (recipe.yaml, adapter_config.json, run_info.json), curves (trainer_state.json's log_history,
drawn with matplotlib as inline SVG), metrics before/after (eval*/metrics.json) and a gallery of held-out
examples (eval/predictions.jsonl, thumbnails inlined as JPEG data URIs), rendered with a Jinja2 template
shipped in finetune/templates. One self-contained file: no network, opens from disk.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
from datetime import datetime, timezone
from pathlib import Path

from finetune.config import parse_yaml
from finetune.errors import FinetuneError
from finetune.tasks import RIGHT_AT, TASKS

log = logging.getLogger("finetune")

REPORT_NAME = "report.html"
DEFAULT_EXAMPLES = 200
THUMB_PX = 96
MAX_THUMBS = 4  # per example; a note says how many more there are
# log_history keys that are bookkeeping, not curves.
NOT_CURVES = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second",
              "train_steps_per_second", "train_loss", "eval_runtime", "eval_samples_per_second",
              "eval_steps_per_second", "grad_norm", "loss", "eval_loss", "learning_rate"}
IMAGE_PLACEHOLDER = "<image>"  # finetune.data.formats.IMAGE: the prompt's image slots, shown as thumbnails


def write_report(run: str | Path, report_examples: int | None = None) -> Path:
    """Write run/report.html from the files in `run`; returns its path. `report_examples` bounds the
    gallery (default: the recipe's eval.report_examples, else 200); every wrong answer is shown first."""
    run = Path(run)
    if not run.is_dir():
        raise FinetuneError(f"{run} is not a run folder")
    recipe = _yaml(run / "recipe.yaml")
    if report_examples is None:
        report_examples = int((recipe.get("eval") or {}).get("report_examples", DEFAULT_EXAMPLES))
    task = recipe.get("task") or ""
    state = trainer_state(run)
    history = state.get("log_history") or []
    predictions_dir = _predictions_dir(run)
    after = _json((predictions_dir or run / "eval") / "metrics.json")
    before = _json(run / "eval-before" / "metrics.json")
    datasets = {(m or {}).get("dataset") for m in (before, after)}
    same_data = not (before and after) or None in datasets or len(datasets) == 1
    if not same_data:  # a later `finetune eval` on other data: the base's scores are not comparable
        before = None
    after_label = ("after training" if predictions_dir is None or predictions_dir.name == "eval"
                   else f"at step {predictions_dir.name.removeprefix('eval-step-')}")
    rows = _jsonl(predictions_dir / "predictions.jsonl") if predictions_dir else []
    before_rows = {r.get("id"): r for r in _jsonl(run / "eval-before" / "predictions.jsonl")} if same_data else {}
    gallery = build_gallery(rows, before_rows, right_at(task), report_examples)
    context = {
        "title": run.resolve().name,
        "task": task,
        "summary": summary(run, recipe, state, _json(run / "run_info.json")),
        "charts": charts(history),
        "metrics": metrics_table(before, after, _headline(task, after or before or {}), after_label),
        "dataset": (after or before or {}).get("dataset"),
        "gallery": gallery,
        "predictions_source": predictions_dir.relative_to(run).as_posix() if predictions_dir else None,
        "total_examples": len(rows),
        "report_examples": report_examples,
        "right_at": right_at(task),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = run / REPORT_NAME
    path.write_text(_template().render(**context), encoding="utf-8")
    return path


def refresh_report(run: Path, report_examples: int | None = None) -> Path | None:
    """write_report for train and eval: a report that cannot be written is a warning, never a failed run."""
    try:
        return write_report(run, report_examples)
    except Exception as err:  # noqa: BLE001 - hours of training must not be lost to the report
        log.warning("report.html not written: %s: %s", type(err).__name__, err)
        return None


def right_at(task: str) -> float:
    """The per-example score at which the gallery counts an answer as right (finetune.tasks.Task.right_at)."""
    return TASKS[task].right_at if task in TASKS else RIGHT_AT


# ------------------------------------------------------------------------------------------- reading

def trainer_state(run: Path) -> dict:
    """trainer_state.json; for a run that never finished, the newest checkpoint's. Its log_history already
    holds a resumed run's whole history (Trainer reloads it from the checkpoint)."""
    state = _json(run / "trainer_state.json")
    if state is None:
        checkpoints = [p for p in run.glob("checkpoint-*/trainer_state.json")
                       if p.parent.name.removeprefix("checkpoint-").isdigit()]
        newest = max(checkpoints, key=lambda p: int(p.parent.name.removeprefix("checkpoint-")), default=None)
        state = _json(newest) if newest else None
    return state or {}


def _predictions_dir(run: Path) -> Path | None:
    """eval/ (the final evaluation), else the newest eval-step-N/ written during training."""
    if (run / "eval" / "predictions.jsonl").is_file():
        return run / "eval"
    steps = [p.parent for p in run.glob("eval-step-*/predictions.jsonl")
             if p.parent.name.removeprefix("eval-step-").isdigit()]
    return max(steps, key=lambda p: int(p.name.removeprefix("eval-step-")), default=None)


def _json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path and path.is_file() else None
    except (OSError, ValueError) as err:
        log.warning("%s unreadable, left out of the report: %s", path, err)
        return None


def _yaml(path: Path) -> dict:
    return (parse_yaml(path.read_text()) or {}) if path.is_file() else {}


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("%s: a line is not JSON; left out of the report", path)
    return rows


# ------------------------------------------------------------------------------------------- summary

def summary(run: Path, recipe: dict, state: dict, info: dict | None) -> list[tuple[str, str]]:
    """(label, text) rows: what was trained, on what, how long, where."""
    model, data = recipe.get("model") or {}, recipe.get("data") or {}
    adapter = _json(run / "adapter_config.json") or {}
    info = info or {}
    rows = [("Base model", str(model.get("name") or adapter.get("base_model_name_or_path") or "unknown")
             + (" (4-bit NF4, QLoRA)" if model.get("quantization") == "4bit" else "")),
            ("Task", recipe.get("task") or "unknown"),
            ("Training data", str(data.get("train") or "unknown")),
            ("Held-out data", str(data.get("eval") or "none"))]
    rows.append(("Adapter", _adapter_text(adapter, recipe.get("adapter") or {})))
    trainable, total = info.get("trainable_parameters"), info.get("total_parameters")
    if trainable is None:
        trainable = _adapter_file_parameters(run)
    if trainable is not None:
        rows.append(("Trainable parameters", f"{trainable:,}" + (
            f" of {total:,} ({100 * trainable / total:.2f}%)" if total else " (counted in the adapter file)")))
    if recipe.get("train"):
        rows.append(("Training settings", ", ".join(f"{k}={v}" for k, v in recipe["train"].items())))
    history = state.get("log_history") or []
    if state:
        losses = [e["loss"] for e in history if isinstance(e.get("loss"), (int, float))]
        rows.append(("Steps", f"{state.get('global_step')} ({_number(state.get('epoch') or 0)} epochs)"
                     + (f", final training loss {losses[-1]:.4g}" if losses else "")))
    runtime = next((e["train_runtime"] for e in reversed(history) if "train_runtime" in e), None)
    if info.get("seconds") is not None or runtime is not None:
        parts = [f"{_duration(info['seconds'])} in all"] if info.get("seconds") is not None else []
        parts += [f"{_duration(runtime)} of training"] if runtime is not None else []
        rows.append(("Time", ", ".join(parts)))
    if info.get("hardware"):
        rows.append(("Hardware", info["hardware"]))
    if info.get("started"):
        rows.append(("Started", info["started"]))
    versions = [f"{name} {info[f'{name}_version']}" for name in ("finetune", "torch", "transformers")
                if info.get(f"{name}_version")]
    if versions:
        rows.append(("Versions", ", ".join(versions)))
    return rows


def _adapter_text(adapter: dict, settings: dict) -> str:
    if not adapter:
        return "no adapter_config.json"
    targets = adapter.get("target_modules") or []
    kind = "DoRA" if adapter.get("use_dora") else "LoRA"
    text = (f"{kind} r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, dropout={adapter.get('lora_dropout')}"
            + (", rsLoRA" if adapter.get("use_rslora") else "")
            + (f" on {len(targets)} layers" if isinstance(targets, list) else f" on {targets}"))
    if settings.get("lora") is False:
        text = "no LoRA"
    full = adapter.get("modules_to_save") or []
    return text + (f"; trained fully: {', '.join(full)}" if full else "")


def _adapter_file_parameters(run: Path) -> int | None:
    """Parameters stored in the adapter file (what training updated), for runs without run_info.json."""
    from safetensors import safe_open

    path = run / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as handle:  # reads the header only
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118 (not iterable)


def _duration(seconds: float) -> str:
    seconds = round(float(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


# -------------------------------------------------------------------------------------------- curves

def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged quantity; a step logged twice (a resumed run) keeps its last value."""
    points = {}
    for entry in history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in entry:
            points[int(entry["step"])] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def charts(history: list[dict]) -> list[dict]:
    """[{"id", "title", "svg"}]: loss (training and held-out), learning rate, held-out metrics by step."""
    metric_keys = sorted({k for e in history for k in e if k.startswith("eval_") and k not in NOT_CURVES
                          and "/" not in k and not k.endswith(("_per_second", "_runtime"))
                          and isinstance(e[k], (int, float))})
    panels = [("loss", "Loss", [("loss", "training loss"), ("eval_loss", "held-out loss")]),
              ("learning-rate", "Learning rate", [("learning_rate", "learning rate")]),
              ("eval-metrics", "Held-out metrics during training", [(k, k.removeprefix("eval_")) for k in metric_keys])]
    out = []
    for chart_id, title, keys in panels:
        lines = [(name, label, *series(history, name)) for name, label in keys]
        lines = [line for line in lines if line[2]]
        if lines:
            out.append({"id": chart_id, "title": title, "svg": _plot(title, lines)})
    return out


def _plot(title: str, lines: list[tuple]) -> str:
    """One small chart as an inline <svg> (text kept as text, so it is small and uses the page's font).

    A bare matplotlib Figure, not pyplot: no backend is selected and no global state changes, so writing
    a report inside a notebook leaves its inline plots alone."""
    import matplotlib
    from matplotlib.figure import Figure

    style = {"svg.fonttype": "none", "svg.hashsalt": "finetune-report", "font.size": 9,
             "axes.spines.top": False, "axes.spines.right": False}
    with matplotlib.rc_context(style):
        fig = Figure(figsize=(4.6, 2.8), layout="constrained")
        ax = fig.subplots()
        for name, label, steps, values in lines:
            sparse = len(steps) < 30  # a few eval points: markers, so a single point shows
            (line,) = ax.plot(steps, values, label=label, marker="o" if sparse else None, markersize=3,
                              linewidth=1.5)
            line.set_gid(f"curve-{re.sub(r'[^A-Za-z0-9_-]+', '-', name)}")
        ax.set_xlabel("step")
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        if title == "Learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len(lines) > 1:
            ax.legend(frameon=False)
        else:
            ax.set_ylabel(lines[0][1])
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


# ------------------------------------------------------------------------------------------- metrics

def _headline(task: str | None, metrics: dict) -> str | None:
    return TASKS[task].headline_in(metrics) if task in TASKS else None


def metrics_table(before: dict | None, after: dict | None, headline: str | None,
                  after_label: str = "after training") -> dict | None:
    """{"columns": [...], "rows": [{"metric", "values", "change", "headline", "better"}]}."""
    sources = [(name, m) for name, m in (("before training", before), (after_label, after)) if m]
    if not sources:
        return None
    keys = [k for _, m in sources for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    keys = sorted(dict.fromkeys(keys), key=lambda k: (k != headline, k in ("examples", "examples_per_second")))
    rows = []
    for key in keys:
        values = [m.get(key) for _, m in sources]
        change = None
        if len(values) == 2 and all(isinstance(v, (int, float)) for v in values) and key != "examples_per_second":
            change = values[1] - values[0]
        rows.append({"metric": key, "values": ["" if v is None else _number(v) for v in values],
                     "change": None if change is None else f"{change:+.4g}", "headline": key == headline,
                     "better": None if change is None or change == 0 else change > 0})
    return {"columns": [name for name, _ in sources], "rows": rows}


# ------------------------------------------------------------------------------------------- gallery

def verdict(row: dict, threshold: float) -> str:
    """right | wrong | unscored (an old predictions.jsonl without per-example scores)."""
    score = row.get("score")
    if not isinstance(score, (int, float)):
        return "unscored"
    return "right" if score >= threshold else "wrong"


def select_examples(rows: list[dict], limit: int, threshold: float) -> list[dict]:
    """At most `limit` rows: every wrong one first (worst first), the rest spread evenly over the file;
    returned worst first (unscored last, file order among equals)."""
    if len(rows) <= limit:
        chosen = list(range(len(rows)))
    else:
        wrong = sorted((i for i, r in enumerate(rows) if verdict(r, threshold) == "wrong"),
                       key=lambda i: rows[i]["score"])[:limit]
        others = [i for i, r in enumerate(rows) if verdict(r, threshold) != "wrong"]
        room = limit - len(wrong)
        spread = [others[k * len(others) // room] for k in range(room)] if room > 0 and others else []
        chosen = wrong + spread
    return [rows[i] for i in sorted(chosen, key=lambda i: _order(rows[i], i))]


def _order(row: dict, index: int) -> tuple:
    score = row.get("score")
    return (0, score, index) if isinstance(score, (int, float)) else (1, 0.0, index)


def build_gallery(rows: list[dict], before: dict, threshold: float, limit: int) -> dict:
    """Cards (template-ready) plus the thumbnails they share: one CSS class per distinct image."""
    thumbs: dict[str, tuple[str, str | None]] = {}  # path -> (CSS class, data URI or None): inlined once
    cards = []
    for row in select_examples(rows, limit, threshold):
        images = [str(p) for p in row.get("images") or []]
        for path in images[:MAX_THUMBS]:
            if path not in thumbs:
                thumbs[path] = (f"t{len(thumbs)}", thumbnail(path))
        previous = before.get(row.get("id"))
        cards.append({
            "id": str(row.get("id", "")),
            "images": [{"path": p, "css": thumbs[p][0] if thumbs[p][1] else None}
                       for p in images[:MAX_THUMBS]],
            "more_images": max(0, len(images) - MAX_THUMBS),
            "prompt": _clean(row.get("prompt", "")),
            "turns": _turns(row.get("messages")),
            "prediction": str(row.get("prediction", "")),
            "references": [str(r) for r in row.get("references") or []],
            "score": _number(row["score"]) if isinstance(row.get("score"), (int, float)) else None,
            "verdict": verdict(row, threshold),
            "top5": [{"text": str(c.get("text", "")), "score": _number(c.get("score")), "match": bool(c.get("match"))}
                     for c in (row.get("top5") or [])[:5]],
            "before": None if previous is None else {
                "prediction": str(previous.get("prediction", "")),
                "score": _number(previous["score"]) if isinstance(previous.get("score"), (int, float)) else None},
        })
    counts = {name: sum(c["verdict"] == name for c in cards) for name in ("wrong", "right", "unscored")}
    all_wrong = sum(verdict(r, threshold) == "wrong" for r in rows)
    return {"cards": cards, "counts": counts, "wrong_in_all": all_wrong,
            "thumbs": dict(item for item in thumbs.values() if item[1])}


def thumbnail(path: str) -> str | None:
    """A small JPEG of the image as a data: URI; None when the file is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=82)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _clean(text) -> str:
    return str(text).replace(IMAGE_PLACEHOLDER, "").strip()


def _turns(messages) -> list[dict]:
    """The dialogue before the predicted reply, when it is more than one user message (multi-turn)."""
    if not isinstance(messages, list):
        return []
    turns = [{"role": str(m.get("role", "")), "content": _clean(m.get("content", ""))}
             for m in messages if isinstance(m, dict)]
    return turns if sum(t["role"] != "system" for t in turns) > 1 else []


def _template():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("finetune", "templates"), autoescape=select_autoescape(["j2", "html"]),
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")
