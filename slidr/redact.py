"""Redact secrets before anything is printed or logged.

``redact_url`` hides the password of a URL's userinfo (``redis://:pw@host`` -> ``redis://:***@host``) and the
values of secret-looking query parameters (``?password=pw`` -> ``?password=***``); everything else (scheme, user
name, host, port, path) stays so the message still says where it connects. A malformed URL whose password holds
an unescaped ``/``, ``?`` or ``#`` is redacted up to its last ``@``: when in doubt, more is hidden, never less.
"""

from __future__ import annotations

import re

MASK = "***"
# query parameters whose values are secrets (substring match on the lower-cased name)
SECRET_PARAMS = ("pass", "pwd", "secret", "token", "auth", "apikey", "api_key", "credential")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _redact_query(query: str) -> str:
    parts = []
    for item in query.split("&"):
        name, eq, _value = item.partition("=")
        secret = eq and any(s in name.lower() for s in SECRET_PARAMS)
        parts.append(f"{name}={MASK}" if secret else item)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """``url`` with its password and secret query values replaced by ``***`` (a non-URL comes back unchanged)."""
    m = _SCHEME.match(url)
    if m is None:
        return url
    scheme, rest = m.group(0), url[m.end():]
    auth_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, auth_end)
    if at < 0 and ":" in rest[:auth_end] and "@" in rest[auth_end:]:
        at = rest.rfind("@")  # malformed: an unescaped / ? or # in the password; hide up to the last @
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        if colon and password:
            rest = f"{user}:{MASK}{rest[at:]}"
    body, hash_, fragment = rest.partition("#")
    head, q, query = body.partition("?")
    if q:
        body = f"{head}?{_redact_query(query)}"
    return f"{scheme}{body}{hash_}{fragment}"
