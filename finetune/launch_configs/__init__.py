"""The Accelerate config files shipped with the package (`accelerate launch --config_file`), found by name.

Each file's first line is `# description: ...`: a comment, not a key, because accelerate rejects keys it does not
know.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from finetune.errors import ConfigError

FOLDER = Path(__file__).resolve().parent
DESCRIPTION = "# description:"


def shipped_configs() -> dict[str, Path]:
    """Name (the file's stem) -> absolute path, in name order."""
    return {path.stem: path for path in sorted(FOLDER.glob("*.yaml"))}


def config_path(name: str) -> Path:
    configs = shipped_configs()
    if name in configs:
        return configs[name]
    hint = difflib.get_close_matches(name, list(configs), n=3)
    raise ConfigError(
        f"launch config not found: {name}" + (f" (did you mean {', '.join(hint)}?)" if hint else "")
        + " - `finetune configs` lists the shipped ones"
    )


def description(path: Path) -> str:
    """The text after `# description:` on the file's first line; empty when that line is something else."""
    first = path.read_text().partition("\n")[0]
    return first[len(DESCRIPTION):].strip() if first.startswith(DESCRIPTION) else ""
