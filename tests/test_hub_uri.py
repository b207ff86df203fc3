"""hf://org/repo@revision parsed and built in one place, with the ledger's strings unchanged."""

from __future__ import annotations

import pytest

from mergeops.hub_uri import HubUri, is_commit_sha, is_hub


@pytest.mark.parametrize("text", ["hf://acme/model@" + "a" * 40, "hf://acme/model@main", "hf://acme/model",
                                  "hf://acme/model@", "hf://acme/model@feature@x"])
def test_a_hub_uri_round_trips_to_the_exact_string(text):
    uri = HubUri.parse(text)
    assert uri is not None and str(uri) == text
    assert uri.public_name == text.removeprefix("hf://")


def test_parts_of_a_hub_uri():
    assert HubUri.parse("hf://acme/model@main") == HubUri("acme/model", "main")
    assert HubUri.parse("hf://acme/model") == HubUri("acme/model", None)
    assert HubUri.parse("hf://acme/model@a@b") == HubUri("acme/model", "a@b")  # a repo id never holds "@"
    assert str(HubUri("acme/model", "f" * 40)) == "hf://acme/model@" + "f" * 40


@pytest.mark.parametrize("text", ["models/base", "/abs/path", "", "hf:/x", "HF://acme/model"])
def test_local_paths_are_not_hub_uris(text):
    assert HubUri.parse(text) is None
    assert not is_hub(text)


def test_commit_shas():
    assert is_commit_sha("0123456789abcdef0123456789abcdef01234567")
    assert not is_commit_sha("main")
    assert not is_commit_sha("0123456789ABCDEF0123456789abcdef01234567")
