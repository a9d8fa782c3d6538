"""Random malformed rows: the reader either converts them or raises its own DataError, nothing else."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data.formats import IMAGE, row_to_examples
from finetune.errors import DataError

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                    st.sampled_from(["<image>", "human", "gpt", "user", "assistant", "system", "developer", "image",
                                     "text", "image_url", "input_image", "input_text", "output_text", "video_url",
                                     "file:///a.png", "https://x.org/a.png", ""]))
values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.sampled_from(
        ["from", "value", "role", "content", "type", "text", "image", "path", "image_url", "url"]), children,
        max_size=4)),
    max_leaves=12)
keys = st.sampled_from(["image", "images", "conversations", "messages", "question", "answer", "answers", "caption",
                        "captions", "id", "question_type", "system", "system_prompt", "other"])
rows = st.dictionaries(keys, values, max_size=5)
formats = st.sampled_from(["auto", "llava", "messages", "vqa", "caption"])

# Nearly well-formed conversations, so that the content-part paths are reached often, not by luck.
texts = st.one_of(st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8), st.none(), values)
image_values = st.one_of(st.none(), st.text(max_size=8),
                         st.fixed_dictionaries({"url": st.one_of(st.none(), st.text(max_size=8))}))
text_parts = st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text", "output_text"])},
                                   optional={"text": texts, "value": texts})
image_parts = st.fixed_dictionaries({"type": st.sampled_from(["image", "image_url", "input_image"])},
                                    optional={"image": image_values, "image_url": image_values,
                                              "path": image_values, "url": image_values, "value": image_values})
parts = st.one_of(text_parts, image_parts, text_parts, image_parts, text_parts, image_parts, values)
contents = st.one_of(st.text(min_size=1, max_size=12), st.lists(parts, min_size=1, max_size=4), st.none())
replies = st.one_of(st.text(min_size=1, max_size=12), st.lists(st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(min_size=1, max_size=8)}), min_size=1, max_size=2), contents)


def turn(roles, content=contents):
    return st.one_of(st.fixed_dictionaries({"role": roles, "content": content}),
                     st.fixed_dictionaries({"from": roles, "value": content}),
                     st.fixed_dictionaries({"role": roles}))


exchanges = st.lists(st.tuples(turn(st.sampled_from(["user", "human"])),
                               turn(st.sampled_from(["assistant", "gpt"]), replies)),
                     min_size=1, max_size=3).map(lambda pairs: [t for pair in pairs for t in pair])
odd_turns = st.lists(turn(st.sampled_from(["system", "developer", "user", "assistant", "robot"])), max_size=1)
conversation = st.builds(lambda head, body, tail: head + body + tail, odd_turns, exchanges, odd_turns)
extra_columns = {"images": st.lists(st.text(max_size=8), max_size=3), "system_prompt": texts, "system": texts}
conversations = st.one_of(st.fixed_dictionaries({"messages": conversation}, optional=extra_columns),
                          st.fixed_dictionaries({"conversations": conversation}, optional=extra_columns))


def check(row, fmt="auto", system_prompt=None, named=False):
    try:
        examples = row_to_examples(row, fmt, system_prompt=system_prompt)
    except DataError as err:
        # named: every problem of a conversation's shape has its own message, not the generic catch-all.
        assert not (named and str(err).startswith("malformed row (")), err
        return
    for example in examples:
        assert isinstance(example.images, tuple)
        assert any(m["role"] == "assistant" for m in example.messages)
        assert all(isinstance(m["content"], str) for m in example.messages)
        assert sum(m["content"].count(IMAGE) for m in example.messages) == len(example.images)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=rows, fmt=formats)
def test_malformed_rows_read_or_raise_data_error(row, fmt):
    check(row, fmt)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=conversations, system_prompt=st.one_of(st.none(), st.text(max_size=8)))
def test_random_content_parts_read_or_raise_data_error(row, system_prompt):
    check(row, system_prompt=system_prompt, named=True)
