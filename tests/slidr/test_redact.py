"""``redact_url``: passwords and secret query values never reach a printed line; the rest stays readable."""

from __future__ import annotations

import pytest

from slidr.redact import redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@localhost:6379/0", "redis://:***@localhost:6379/0"),
    ("rediss://default:s3cret@cache.example.com:6380/2", "rediss://default:***@cache.example.com:6380/2"),
    ("redis://:p@ss:w0rd@host", "redis://:***@host"),                     # '@' and ':' inside the password
    ("redis://:ab/cd+ef==@host:6379", "redis://:***@host:6379"),          # unescaped '/' (base64 password)
    ("redis://user:pa?ss#x@host/1", "redis://user:***@host/1"),          # unescaped '?' and '#'
    ("redis://:pa%40ss@host", "redis://:***@host"),                       # percent-escaped
    ("redis://localhost:6379/0?password=s3cret&db=1", "redis://localhost:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?db=0&Password=s3cret", "unix:///run/redis.sock?db=0&Password=***"),
    ("https://h/p?api_key=k&token=t&q=1#frag", "https://h/p?api_key=***&token=***&q=1#frag"),
])
def test_secrets_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


@pytest.mark.parametrize("url", [
    "redis://localhost:6379/0",
    "redis://127.0.0.1:6379",
    "rediss://alice@cache.example.com:6380/0",   # a user name is not a secret
    "redis://user:@host",                        # empty password: nothing to hide
    "redis://localhost:6379/0?db=1&client_name=slidr",
    "localhost:9092,other:9092",                 # not a URL
    "",
])
def test_nothing_secret_is_unchanged(url: str) -> None:
    assert redact_url(url) == url


def test_ambiguous_at_sign_hides_more_never_less() -> None:
    # '@' after host:port could end a password holding an unescaped '/': treated as one
    assert redact_url("redis://host:6379/0?client_name=a@b") == "redis://host:***@b"
