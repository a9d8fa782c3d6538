"""Random malformed rows: the reader either converts them or raises its own DataError, nothing else."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data.formats import row_to_examples
from finetune.errors import DataError

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                    st.sampled_from(["<image>", "human", "gpt", "user", "assistant", "system", "image", "text"]))
values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.sampled_from(
        ["from", "value", "role", "content", "type", "text", "image", "path"]), children, max_size=4)),
    max_leaves=12)
keys = st.sampled_from(["image", "images", "conversations", "messages", "question", "answer", "answers", "caption",
                        "captions", "id", "question_type", "other"])
rows = st.dictionaries(keys, values, max_size=5)
formats = st.sampled_from(["auto", "llava", "messages", "vqa", "caption"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=rows, fmt=formats)
def test_malformed_rows_read_or_raise_data_error(row, fmt):
    try:
        examples = row_to_examples(row, fmt)
    except DataError:
        return
    for example in examples:
        assert isinstance(example.images, tuple)
        assert any(m["role"] == "assistant" for m in example.messages)
        assert all(isinstance(m["content"], str) for m in example.messages)
