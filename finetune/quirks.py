"""What some published checkpoints get wrong or do differently, as data: the encoder reads this table instead of
branching on model families across modules."""

from __future__ import annotations

# Literal text some published chat templates write where the end-of-sequence token belongs; replaced by the
# tokenizer's EOS when rendering. llava-hf/llava-v1.6-mistral-7b-hf's chat_template.json ends every reply with the
# five characters "<\s> " (a backslash), so a model trained on it learns to print them instead of stopping.
LITERAL_END_MARKERS = ("<\\s>",)

# Processors of prefix-LM models that take (prefix, suffix) instead of a chat: the prefix attends bidirectionally
# (token_type_ids 0), the suffix causally (1), and there is no chat template (google/paligemma*-pt, -mix).
PREFIX_LM_PROCESSORS = ("PaliGemmaProcessor",)


def is_prefix_lm(processor) -> bool:
    return type(processor).__name__ in PREFIX_LM_PROCESSORS
