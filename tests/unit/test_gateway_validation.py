"""Gateway request validation: every bad field -> InvalidArgument with a message saying what is allowed."""

from __future__ import annotations

import math

import pytest

from modelgrid.errors import InvalidArgument
from services.gateway.validation import (
    Limits,
    check_token_ids,
    parse_embed,
    parse_generate,
    plan_max_tokens,
)

LIMITS = Limits(default_max_tokens=16, max_tokens_cap=100, max_prompt_tokens=50)


def generate(**overrides):
    fields = dict(
        model="tiny-llama", version="", text="hello", token_ids=None, max_tokens=None, temperature=None,
        top_p=None, top_k=None, seed=None, stop=[], limits=LIMITS,
    )
    fields.update(overrides)
    return parse_generate(**fields)


def test_defaults() -> None:
    p = generate()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed, p.stop) == (1.0, 1.0, 0, None, None, ())
    assert p.text == "hello" and p.token_ids is None


def test_good_values_pass_through() -> None:
    p = generate(text=None, token_ids=[1, 2, 3], max_tokens=100, temperature=0.0, top_p=0.5, top_k=7, seed=42,
                 stop=["\n", "abc"], version="v2", model="a.b_c-1")
    assert p.token_ids == (1, 2, 3)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (100, 0.0, 0.5, 7, 42, ("\n", "abc"))
    assert generate(temperature=2.0).temperature == 2.0
    assert generate(top_p=1.0).top_p == 1.0


BAD_GENERATE = [
    ({"model": "../x"}, "model name '../x' is invalid"),
    ({"model": "Upper"}, "a-z, 0-9"),
    ({"model": ""}, "model name '' is invalid"),
    ({"model": "a" * 65}, "1-64 characters"),
    ({"model": "a..b"}, "no '..'"),
    ({"model": "a/b"}, "is invalid"),
    ({"version": "../v1"}, "version '../v1' is invalid"),
    ({"text": None}, "the prompt is empty"),
    ({"text": ""}, "the prompt is empty"),
    ({"text": None, "token_ids": []}, "at least one token id"),
    ({"text": "x", "token_ids": [1]}, "not both"),
    ({"text": None, "token_ids": [3, -1]}, "token_ids[1] = -1 is negative"),
    ({"text": None, "token_ids": [1] * 51}, "at most 50"),
    ({"max_tokens": 0}, "max_tokens must be in [1, 100], got 0"),
    ({"max_tokens": -5}, "got -5"),
    ({"max_tokens": 101}, "max_tokens must be in [1, 100], got 101"),
    ({"temperature": -0.1}, "temperature must be a finite number in [0, 2]"),
    ({"temperature": 2.5}, "in [0, 2]"),
    ({"temperature": math.nan}, "got nan"),
    ({"temperature": math.inf}, "got inf"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_p": -1.0}, "got -1.0"),
    ({"top_p": math.nan}, "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences"),
    ({"stop": ["ok", ""]}, "stop[1] must be 1 to 64 characters"),
    ({"stop": ["x" * 65]}, "stop[0] must be 1 to 64 characters"),
]


@pytest.mark.parametrize("overrides,message", BAD_GENERATE, ids=[m for _, m in BAD_GENERATE])
def test_bad_generate_field(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        generate(**overrides)
    assert message in info.value.message
    assert info.value.code == "INVALID_ARGUMENT"


def test_token_ids_must_be_in_vocab() -> None:
    check_token_ids([0, 511], 512, "m v1")
    message = r"token_ids\[1\] = 512 is outside the vocabulary of m v1: ids must be in \[0, 512\)"
    with pytest.raises(InvalidArgument, match=message):
        check_token_ids([0, 512], 512, "m v1")


def test_plan_max_tokens() -> None:
    assert plan_max_tokens(10, None, 2048, LIMITS) == 16  # the default
    assert plan_max_tokens(10, None, 20, LIMITS) == 10  # the default, clamped to the context
    assert plan_max_tokens(10, 30, 40, LIMITS) == 30  # exactly fills the context
    message = (r"prompt \(10 tokens\) \+ max_tokens \(31\) = 41 exceeds the model's context of 40 tokens; "
               "lower max_tokens to at most 30")
    with pytest.raises(InvalidArgument, match=message):
        plan_max_tokens(10, 31, 40, LIMITS)
    with pytest.raises(InvalidArgument, match="leaves no room in the model's context of 10"):
        plan_max_tokens(10, None, 10, LIMITS)
    with pytest.raises(InvalidArgument, match="the prompt is 51 tokens; at most 50"):
        plan_max_tokens(51, 1, 2048, LIMITS)
    with pytest.raises(InvalidArgument, match="tokenized to no tokens"):
        plan_max_tokens(0, 1, 2048, LIMITS)


def test_embed_validation() -> None:
    assert parse_embed(model="mini", version="", texts=["a", "b"]).texts == ("a", "b")
    for texts, message in [([], "texts must hold 1 to 256 strings, got 0"), (["x"] * 257, "got 257"),
                           (["a", ""], "texts[1] is empty")]:
        with pytest.raises(InvalidArgument) as info:
            parse_embed(model="mini", version="", texts=texts)
        assert message in info.value.message
    with pytest.raises(InvalidArgument, match="model name"):
        parse_embed(model="../etc", version="", texts=["a"])
