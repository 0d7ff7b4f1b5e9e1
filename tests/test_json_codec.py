"""service/json_codec.py: orjson's speed without its stricter grammar. Every document the
standard library parses still parses with `loads` (the engine's answers), to the same
value; every one it refuses is still refused, with its error; a client's body
(`loads_request`) must be strict JSON; what orjson cannot write is written by the
standard library."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from service import json_codec

# Each is valid for the standard library and refused by orjson.
ONLY_STDLIB = [
    b'{"temperature": NaN}',
    b'{"x": -Infinity}',
    b'{"content": "\\ud800"}',
    '{"content": "é"}'.encode("utf-16"),
]


@pytest.mark.parametrize("number", [2**63, 2**64, -(2**63) - 1, 10**30, -(10**40)])
def test_integers_past_64_bits_keep_every_digit(number):
    raw = b'{"seed": %d, "n": [1, %d]}' % (number, number)
    assert json_codec.loads(raw) == {"seed": number, "n": [1, number]}


@pytest.mark.parametrize("raw", ONLY_STDLIB)
def test_what_orjson_refuses_or_misreads_parses_as_the_standard_library_parses_it(raw):
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    got, want = json_codec.loads(raw), json.loads(raw)
    if isinstance(want.get("temperature"), float):
        assert math.isnan(got["temperature"])
    else:
        assert got == want


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1,}', b"[1] [2]", b"{'a': 1}"])
def test_what_both_refuse_raises_the_standard_librarys_error(raw):
    with pytest.raises(json.JSONDecodeError) as caught:
        json_codec.loads(raw)
    assert type(caught.value) is json.JSONDecodeError  # not orjson's subclass


def test_undecodable_bytes_raise_the_standard_librarys_unicode_error():
    with pytest.raises(UnicodeDecodeError):
        json_codec.loads(b"\xff\xfe{")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_any_document_round_trips_and_reads_as_the_standard_library_reads_it(value):
    raw = json_codec.dumps(value)
    assert json_codec.loads(raw) == json.loads(raw) == value
    assert json_codec.loads_request(raw) == value


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        *zip(ONLY_STDLIB, ["NaN", "Infinity", "surrogate", "UTF-8"], strict=True),
        (b'{"a": ["ok", {"\\udfff": 1}]}', "surrogate"),
        (b'{"n": 1%s}' % (b"0" * 5000), "digits"),
        (b"[" * 100_000, "deeply"),
        (b'{"a": 1,}', "line 1 column 9"),
    ],
)
def test_a_request_body_must_be_strict_json(raw, reason):
    with pytest.raises(json_codec.InvalidJSON, match=reason):
        json_codec.loads_request(raw)


def test_a_surrogate_pair_is_unicode_and_reads_in_a_request():
    assert json_codec.loads_request(b'{"c": "\\ud83e\\udde0"}') == {"c": "\U0001f9e0"}


def test_a_lone_surrogate_read_from_the_engine_is_written_as_its_escape():
    value = json_codec.loads(b'{"content": "a\\ud800", "n": %d}' % 2**70)
    assert json_codec.dumps(value) == b'{"content":"a\\ud800","n":%d}' % 2**70


def test_written_as_starlette_writes_json_responses():
    content = {"id": "x", "choices": [{"text": "naïve 🧠", "n": 1.5}], "usage": None}
    assert json_codec.dumps(content) == JSONResponse(content).body
    assert json_codec.FastJSONResponse(content).body == JSONResponse(content).body


def test_what_orjson_cannot_write_the_standard_library_writes():
    big = {"seed": 2**70, 3: "int key"}
    assert json.loads(json_codec.dumps(big)) == {"seed": 2**70, "3": "int key"}


def test_a_nan_is_written_as_null_not_as_a_bare_nan():
    assert json_codec.dumps({"x": float("nan"), "y": float("inf")}) == b'{"x":null,"y":null}'


def test_the_log_renderer_takes_structlogs_default_and_returns_text():
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    line = json_codec.dumps_str({"event": "e", "obj": Opaque(), "n": 2**70}, default=repr)
    assert json.loads(line) == {"event": "e", "obj": "<opaque>", "n": 2**70}
