"""The depth check counts brackets outside strings only, and lets ordinary bodies through."""

from __future__ import annotations

import json

from pmoves_e2b.request_guard import MAX_JSON_DEPTH, json_depth_exceeds


def test_deep_nesting_is_caught_and_strings_do_not_count() -> None:
    assert json_depth_exceeds(b"[" * (MAX_JSON_DEPTH + 1))
    assert not json_depth_exceeds(json.dumps({"code": "[" * 10_000 + '"\\"[{'}).encode())
    assert not json_depth_exceeds(json.dumps([[1, 2]] * 10_000).encode())  # many brackets, shallow
    nested: object = 1
    for _ in range(MAX_JSON_DEPTH):
        nested = [nested]
    assert not json_depth_exceeds(json.dumps(nested).encode())
    assert json_depth_exceeds(json.dumps([nested]).encode())
