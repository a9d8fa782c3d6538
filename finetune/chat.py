"""`finetune chat`: a multi-turn conversation about one image in the terminal."""

from __future__ import annotations

from pathlib import Path

from finetune.evaluation import open_target
from finetune.generation import generate
from finetune.tasks import TASKS

HELP = "type a message; /reset starts over, /quit (or Ctrl-D) ends"


def chat(run, image: str | None, max_new_tokens: int | None = None, read=input, write=print) -> list[dict]:
    """Runs until /quit or end of input; returns the conversation. `run`: a run folder, Hub repo id or recipe."""
    model, processor, recipe, _ = open_target(run)
    if TASKS[recipe.task].kind != "generative":
        from finetune.errors import ConfigError

        raise ConfigError(f"chat needs a generative run; a {recipe.task} run ranks texts: use finetune predict --labels")
    images = [str(Path(image).resolve())] if image else []
    limit = max_new_tokens or max(TASKS[recipe.task].max_new_tokens, 96)
    messages: list[dict] = []
    write(HELP)
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            break
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = []
            continue
        if not text:
            continue
        first = not messages
        messages.append({"role": "user", "content": ("<image>\n" if first and images else "") + text})
        used = images if any("<image>" in m["content"] for m in messages) else []
        reply = generate(model, processor, [(messages, used, Path.cwd())], limit, quiet=True)[0]
        messages.append({"role": "assistant", "content": reply})
        write(f"model> {reply}")
    return messages
