"""Error events inside a stream say what a non-streamed error would: engine internals
(source paths, pydantic dumps, Python messages) never reach the client mid-stream."""

from __future__ import annotations

import json

from service.chat.stream_relay import normalize_engine_error


def _event(payload: dict) -> dict:
    raw = normalize_engine_error(payload).decode()
    assert raw.startswith("data: ")
    return json.loads(raw[len("data: ") :].strip())["error"]


def test_a_client_error_with_internals_is_cleaned_and_names_the_field() -> None:
    message = (
        "1 validation error for ChatCompletionRequest\ntools.0.function.parameters\n"
        "  Input should be a valid dictionary [type=dict_type, input_value=3, "
        "input_type=int]\n    For further information visit https://errors.pydantic.dev/2.14/v/"
        'dict_type  File "/usr/lib/python3/site-packages/sglang/srt/entrypoints/openai/'
        'protocol.py", line 412'
    )
    err = _event({"error": {"message": message, "code": 400}})
    assert "site-packages" not in err["message"] and "pydantic" not in err["message"]
    assert err["type"] == "invalid_request_error"


def test_a_server_error_says_only_that_the_engine_failed() -> None:
    err = _event(
        {"error": {"message": "Traceback (most recent call last): KeyError: 'x'", "code": 500}}
    )
    assert "Traceback" not in err["message"] and "KeyError" not in err["message"]
    assert err["type"] == "server_error"


def test_a_clean_client_error_passes_through() -> None:
    err = _event(
        {"error": {"message": "max_tokens is too large", "code": 400, "param": "max_tokens"}}
    )
    assert err["message"] == "max_tokens is too large"
    assert err["param"] == "max_tokens"
