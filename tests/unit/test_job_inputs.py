"""The items of a batch job (services/gateway/job_inputs.py): JSONL and inline items, and the errors that name
the bad line before anything is recorded."""

from __future__ import annotations

import pytest

from modelgrid.errors import InvalidArgument
from services.gateway.job_inputs import JobInput, check_items, parse_jsonl


def test_jsonl_items_keep_their_ids_and_skip_blank_lines() -> None:
    data = b'{"id": "a", "text": "one"}\n\n  \n{"id": 7, "text": "two"}\n{"text": "three"}\n'
    assert parse_jsonl(data, "embed", 10, 64) == [
        JobInput("a", text="one"), JobInput("7", text="two"), JobInput("2", text="three")]
    gen = parse_jsonl(b'{"id": "p", "prompt": "hi", "max_tokens": 5}\n{"prompt": "yo"}', "generate", 10, 64)
    assert gen == [JobInput("p", prompt="hi", max_tokens=5), JobInput("1", prompt="yo")]


@pytest.mark.parametrize("data, kind, message", [
    (b'{"text": "ok"}\n{"text": "ok2"\n', "embed", "line 2: not valid JSON"),
    (b'{"text": "ok"}\n\n\n{"text": ""}', "embed", "line 4: 'text' must be a non-empty string"),
    (b'{"text": 5}', "embed", "line 1: 'text' must be a non-empty string, got 5"),
    (b'{"prompt": "x"}', "embed", "line 1: unknown field 'prompt' (embed items have: id, text)"),
    (b'{"text": "x"}', "generate", "line 1: unknown field 'text'"),
    (b'{"prompt": "x", "max_tokens": 65}', "generate", "line 1: max_tokens must be an integer in [1, 64]"),
    (b'{"prompt": "x", "max_tokens": "3"}', "generate", "line 1: max_tokens must be an integer"),
    (b'{"prompt": "x", "max_tokens": 0}', "generate", "line 1: max_tokens must be an integer in [1, 64] (or absent)"),
    (b'{"id": [1], "text": "x"}', "embed", "line 1: id must be a string or an integer"),
    (b'{"id": 1, "text": "x"}\n{"id": "1", "text": "y"}', "embed", "line 2: id '1' is used twice (first at line 1)"),
    (b'"just a string"', "embed", "line 1: expected a JSON object"),
    (b'{"text": "ok"}\n\xff\xfe', "embed", "line 2: the JSONL file is not valid UTF-8"),
    (b"\n \n", "embed", "no items"),
    (b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}', "embed", "line 3: a job takes at most 2 items"),
    (b'{"text": "a"}', "classify", "job kind must be 'embed' or 'generate'"),
])
def test_the_first_bad_line_is_named(data: bytes, kind: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_jsonl(data, kind, 2, 64)
    assert message in err.value.message


def test_inline_items_are_checked_the_same_way() -> None:
    assert check_items([{"text": "a"}, {"id": "x", "text": "b"}], "embed", 10, 64) == [
        JobInput("0", text="a"), JobInput("x", text="b")]
    with pytest.raises(InvalidArgument, match=r"items\[1\]: 'prompt' must be a non-empty string"):
        check_items([{"prompt": "a"}, {"id": "q"}], "generate", 10, 64)
    with pytest.raises(InvalidArgument, match="at least one item"):
        check_items([], "embed", 10, 64)
