"""`finetune data check`: read every row of data.train and data.eval as training would, report problems."""

from __future__ import annotations

from collections import Counter

from finetune.config import load_recipe
from finetune.data.dataset import Report, _reason_kind, check_examples
from finetune.data.encode import make_encoder
from finetune.errors import ConfigError
from finetune.models import load_processor
from finetune.tasks import TASKS


def check_data(recipe, overrides=None, write=print) -> bool:
    """Prints `file:row: reason` for every unusable row and a summary; True when every row is usable."""
    recipe = load_recipe(recipe, overrides)
    if not recipe.data.train and not recipe.data.eval:
        raise ConfigError("nothing to check: set data.train and/or data.eval")
    contrastive = TASKS[recipe.task].kind == "contrastive"
    # Only the processor is needed (tokenizer, chat template, image processor): no model weights load.
    encoder = None if contrastive else make_encoder(load_processor(recipe.model), recipe.data.max_length)
    cfg = recipe.data
    ok = True
    for spec, split in ((cfg.train, cfg.split), (cfg.eval, cfg.eval_split or "validation")):
        if not spec:
            continue
        relaxed = type(cfg)(**{**cfg.__dict__, "on_too_long": "drop"})
        if contrastive:  # image-text pairs: every image opened, texts are truncated to the text tower's length
            from finetune.data.pairs import check_pairs

            _, report = check_pairs(spec, cfg, split)
        else:
            _, _, report = check_examples(spec, relaxed, encoder, split)
        problems = report.problems + [(loc, f"too long for data.max_length={cfg.max_length} ({length} tokens)")
                                      for loc, length in report.too_long]
        problems.sort(key=lambda problem: _row_number(problem[0]))  # in file order, however they were found
        for location, reason in problems:
            write(f"{location}: {reason}")
        write(_summary(report, problems))
        ok = ok and not problems
    return ok


def _row_number(location: str) -> int:
    row = location.rpartition(":")[2]
    return int(row) if row.isdigit() else -1


def _summary(report: Report, problems: list) -> str:
    counts = Counter(_reason_kind(reason) for _, reason in problems)
    detail = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    return f"{report.source}: {report.rows} rows, {len(problems)} unusable" + (f" ({detail})" if detail else "")
