"""Exact token lengths of examples without decoding their images: the data check's measure.

A row's `len(input_ids)` is the length of its chat-template text (`ChatEncoder.conversation`, what `encode`
tokenizes) after the processor has expanded every image placeholder, and the expansion depends only on the
image's size. So: the size comes from the file's header (`images.image_size`, EXIF orientation applied), the
expansion from the processor's own code (`_get_num_multimodal_tokens`, `replace_image_token`; family by family in
EXPANSIONS), and the text is tokenized in batches by the tokenizer alone.

Rows this cannot measure exactly are encoded in full, as training would encode them: processors without an entry
(or whose settings the entry does not cover, see `_check_formula`), images whose end marker is missing (perhaps
truncated: only decoding tells), tiny images (processors infer the channel axis from the pixel array), and rows
over data.max_length (where the cut falls depends on the labels and image tokens).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from PIL import Image

from finetune.data.encode import ChatEncoder, PrefixLMEncoder, TooLong
from finetune.data.formats import IMAGE, Example
from finetune.data.images import image_size
from finetune.errors import DataError

log = logging.getLogger(__name__)

OK, TOO_LONG, UNUSABLE = 0, 1, 2  # what measuring an example found
TINY = 4  # px: images with a side this small are encoded in full
BATCH = 256  # texts tokenized per tokenizer call
SIZES_KEPT = 50_000  # image sizes remembered within a pass (rows often share images)


# --- per-family expansions: image sizes (height, width) -> the text each placeholder becomes -----------------------
def _repeated(processor, sizes: list[tuple[int, int]]) -> list[str] | None:
    """The placeholder once per image feature (LLaVA, LLaVA-NeXT anyres, Qwen2-VL / 2.5-VL); the formula counts them."""
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    return [processor.image_token * int(n) for n in counts]


def _idefics3(processor, sizes):
    """Idefics3 / SmolVLM: a grid of tiles with row/column tokens and newlines, then the global view."""
    kwargs = processor._merge_kwargs()["images_kwargs"]
    grids = [processor.image_processor.get_number_of_image_patches(h, w, kwargs) for h, w in sizes]
    inputs = {"rows": [[rows for _, rows, _ in grids]], "cols": [[cols for _, _, cols in grids]]}
    return [processor.replace_image_token(inputs, i) for i in range(len(sizes))]


def _gemma3(processor, sizes):
    """Gemma 3: `\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n`; pan-and-scan crops are pixel-dependent
    in number, which no formula gives."""
    if getattr(processor.image_processor, "do_pan_and_scan", False):
        return None
    return [processor.replace_image_token({"num_crops": [0] * len(sizes)}, i) for i in range(len(sizes))]


def _paligemma(processor, sizes):
    return [processor.image_token * processor.image_seq_length for _ in sizes]


# Processor class (exactly: a subclass may expand differently) -> its expansion. Each is checked against a full
# encode of the family's twin in tests/test_measure.py, and against the real processor at start-up (_check_formula).
EXPANSIONS = {
    "LlavaProcessor": _repeated,
    "LlavaNextProcessor": _repeated,
    "Qwen2VLProcessor": _repeated,
    "Qwen2_5_VLProcessor": _repeated,
    "Idefics3Processor": _idefics3,
    "Gemma3Processor": _gemma3,
    "PaliGemmaProcessor": _paligemma,
}
PROBE_SIZES = [(480, 640), (500, 333), (70, 200)]  # (height, width): landscape, portrait, small and wide


class Measurer:
    """Token lengths (or the reason a row is unusable) for examples, as `encoder.encode` would give them."""

    def __init__(self, encoder: ChatEncoder | PrefixLMEncoder):
        self.encoder = encoder
        self.processor = encoder.processor
        self.tokenizer = encoder.tokenizer
        self.max_length = encoder.max_length
        self.full_encodes = 0  # rows that needed the whole encode (tests and benchmarks read it)
        self._expansion = EXPANSIONS.get(type(self.processor).__name__)
        self._by_size: dict[tuple[int, int], tuple[str, int]] = {}
        self._sizes: dict = {}  # image value -> its size in this pass (datasets repeat images)
        self._special = _special_pattern(self.tokenizer)
        if self._expansion is not None and not self._check_formula():
            self._expansion = None
        self.formula = self._expansion is not None  # image rows measured from headers (else encoded in full)
        if not self.formula and hasattr(self.processor, "image_processor"):
            log.info("%s: no exact image-token formula; the data check decodes every image",
                     type(self.processor).__name__)

    # --- the pass ---------------------------------------------------------------------------------------------
    def measure(self, examples: list[Example]) -> list[tuple[int, int, str | None]]:
        """One (OK | TOO_LONG | UNUSABLE, tokens, reason) per example, in order."""
        results: list = [None] * len(examples)
        pending = []  # (index, text to tokenize, tokens the expansions add beyond it)
        for index, example in enumerate(examples):
            try:
                counted = self._prepare(example)
            except DataError as err:
                results[index] = (UNUSABLE, 0, _one_line(err))
                continue
            if counted is None:
                results[index] = self._encode(example)
            else:
                pending.append((index, *counted))
        for start in range(0, len(pending), BATCH):
            batch = pending[start : start + BATCH]
            for (index, _, extra), ids in zip(batch, self._tokenize([text for _, text, _ in batch])):
                tokens = len(ids) + extra
                results[index] = (OK, tokens, None) if tokens <= self.max_length else self._encode(examples[index])
        return results

    def _prepare(self, example: Example) -> tuple[str, int] | None:
        """(text as the tokenizer will see it, tokens to add), or None where only a full encode is exact."""
        if isinstance(self.encoder, PrefixLMEncoder):
            return self._prepare_prefix_lm(example)
        text, _ = self.encoder.conversation(list(example.messages))  # the template's own rejections surface here
        if not example.images:
            return text, 0
        replacements = self._replacements(example)
        if replacements is None:
            return None
        expanded, found = self.processor.get_text_with_replacements([text], [r for r, _ in replacements])
        if len(found[0]) != len(replacements):  # the processor's own error message, from a full encode
            return None
        return expanded[0], sum(extra for _, extra in replacements)

    def _prepare_prefix_lm(self, example: Example):
        """PaliGemma: the images' tokens + BOS + prefix + newline, paired with suffix + EOS (PaliGemmaProcessor's build)."""
        messages = list(example.messages)
        if not example.images or len(messages) < 2 or messages[-1]["role"] != "assistant":
            return None  # the encoder's and the processor's own messages, from a full encode
        prefix, answer = self.encoder._prefix(messages[:-1]), str(messages[-1]["content"]).strip()
        replacements = self._replacements(example)
        if replacements is None:
            return None
        images = "".join(stand_in for stand_in, _ in replacements)
        text = (images + self.tokenizer.bos_token + prefix + "\n", answer + self.tokenizer.eos_token)
        return text, sum(extra for _, extra in replacements)

    def _replacements(self, example: Example) -> list[tuple[str, int]] | None:
        """Per image: what stands in for its expansion in the text, and how many tokens the stand-in lacks; None
        where only a full encode is exact."""
        if self._expansion is None:
            return None
        replacements = []
        for value in example.images:
            size = self._size(value, example.root or Path.cwd())
            if size is None or min(size) < TINY:
                return None
            replacement = self._expanded((size[1], size[0]))  # processors take (height, width)
            if replacement is None:
                return None
            replacements.append(replacement)
        return replacements

    def _size(self, value, root: Path):
        key = (value, root) if isinstance(value, (str, Path)) else None
        if key is not None and key in self._sizes:
            return self._sizes[key]
        size = image_size(value, root)
        if key is not None:
            if len(self._sizes) >= SIZES_KEPT:  # a million distinct images: keep memory flat
                self._sizes.clear()
            self._sizes[key] = size
        return size

    def _expanded(self, size: tuple[int, int]) -> tuple[str, int] | None:
        if size not in self._by_size:
            try:
                expansions = self._expansion(self.processor, [size])
            except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as err:  # e.g. Qwen's too-small
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise DataError(f"the processor rejected the row: {first}") from None
            self._by_size[size] = None if expansions is None else self._stand_in(expansions[0])
        return self._by_size[size]

    def _stand_in(self, expansion: str) -> tuple[str, int]:
        """A short stand-in for an expansion that tokenizes its surroundings identically, and the tokens it lacks.

        The expansion's core, from its first to its last special token, is tokenized on its own (the tokenizer
        splits added tokens out before anything else, so nothing merges across them); the text before and after
        the core (Gemma 3's blank lines) stays in place, where it may merge with the neighbouring text."""
        matches = list(self._special.finditer(expansion)) if self._special else []
        if not matches:
            return expansion, 0
        first, last = matches[0], matches[-1]
        core = expansion[first.start() : last.end()]
        marker = first.group() + (last.group() if len(matches) > 1 else "")
        core_tokens = len(self._tokenize([core])[0])
        marker_tokens = len(self._tokenize([marker])[0])
        return expansion[: first.start()] + marker + expansion[last.end() :], core_tokens - marker_tokens

    # --- helpers ----------------------------------------------------------------------------------------------
    def _tokenize(self, texts: list) -> list[list[int]]:
        if texts and isinstance(texts[0], tuple):  # (text, pair): the prefix-LM processor's call
            return self.tokenizer([t for t, _ in texts], text_pair=[p for _, p in texts], verbose=False)["input_ids"]
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if hasattr(backend, "encode_batch_fast") and not getattr(self.tokenizer, "split_special_tokens", False):
            # What tokenizer(texts) runs, without the offsets and masks only counting does not need.
            return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def _encode(self, example: Example) -> tuple[int, int, str | None]:
        self.full_encodes += 1
        try:
            return OK, len(self.encoder.encode(example)["input_ids"]), None
        except TooLong as err:
            return TOO_LONG, err.length, str(err)
        except DataError as err:
            return UNUSABLE, 0, _one_line(err)

    def _check_formula(self) -> bool:
        """The formula against the processor itself on blank images of a few sizes; any difference (settings the
        entry does not cover) turns it off for this processor, so the check stays exact."""
        messages = ({"role": "user", "content": IMAGE + "\nWhat is in the picture?"},
                    {"role": "assistant", "content": "A cat."})
        probe = Example(messages=messages, images=("probe",), root=Path.cwd())
        unbounded = type(self.encoder)(self.processor, 10**9)
        try:
            for height, width in PROBE_SIZES:
                self._sizes[("probe", Path.cwd())] = (width, height)
                counted = self._prepare(probe)
                mine = len(self._tokenize([counted[0]])[0]) + counted[1] if counted else None
                real = len(unbounded.encode(probe, images=[Image.new("RGB", (width, height), (120, 60, 30))])
                           ["input_ids"])
                if mine != real:
                    log.info("%s: the image-token formula gives %s tokens, the processor %d (%dx%d image); the data "
                             "check decodes every image", type(self.processor).__name__, mine, real, width, height)
                    return False
        except Exception as err:  # noqa: BLE001 - a probe the processor or template refuses: no formula, full encodes
            log.info("%s: cannot check the image-token formula (%s); the data check decodes every image",
                     type(self.processor).__name__, str(err).splitlines()[0] if str(err) else type(err).__name__)
            return False
        finally:
            self._sizes.clear()
            self._by_size.clear()
        return True


def _special_pattern(tokenizer) -> re.Pattern | None:
    added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, added))) if added else None


def _one_line(err: Exception) -> str:
    return (str(err).strip() or type(err).__name__).splitlines()[0]
