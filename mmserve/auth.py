"""Bearer tokens of the public API: where they come from, and a constant-time check of a request's header;
the one-line secret files of the stack."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pathlib
import re
from collections.abc import Sequence

# Comma-separated tokens in the environment, so none needs to appear on a command line (visible in `ps`).
TOKENS_ENV = "MMSERVE_API_TOKENS"
# The one token our command-line clients send, when no --token-file names it.
CLIENT_TOKEN_ENV = "MMSERVE_API_TOKEN"
MISSING = "missing bearer token"
INVALID = "invalid bearer token"
DUPLICATE = "more than one authorization header"

log = logging.getLogger(__name__)

# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# The whole header value: the scheme (case-insensitive, as every HTTP auth scheme: RFC 7235 2.1), one space, the
# token, nothing else.
_BEARER = re.compile(r"(?i:Bearer) ([A-Za-z0-9\-._~+/]+=*)")


def is_bearer_token(text: str) -> bool:
    """Whether text may be sent as a bearer token (RFC 6750's b64token)."""
    return _TOKEN.fullmatch(text) is not None


def read_secret(field: str, path: str) -> str:
    """The one-line secret in path; an unreadable, empty or multi-word file is a ValueError naming the field."""
    try:
        value = pathlib.Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{field}: cannot read {path}: {err}") from None
    if not value or any(c.isspace() for c in value):  # the value itself is never echoed
        raise ValueError(f"{field}: {path} must hold one secret on one line")
    return value


def parse_tokens_file(text: str, source: str) -> list[str]:
    """The tokens of a file: one per line; blank lines and lines starting with # are skipped."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not is_bearer_token(line):  # the token itself is never echoed: it may be a real secret
            raise ValueError(f"{source}:{number}: not a bearer token (letters, digits and -._~+/ only, "
                             "one token per line)")
        tokens.append(line)
    return tokens


def parse_tokens_env(value: str, source: str = TOKENS_ENV) -> list[str]:
    """The tokens of a comma-separated list (the environment variable)."""
    tokens = [t.strip() for t in value.split(",") if t.strip()]
    for index, token in enumerate(tokens, 1):
        if not is_bearer_token(token):
            raise ValueError(f"{source}: entry {index} is not a bearer token (letters, digits and -._~+/ only)")
    return tokens


def load_tokens(tokens_file: str, environ: dict[str, str] | None = None) -> frozenset[str]:
    """Tokens from the file (if named) and the environment variable together; empty means the API is open.

    A file that is named but holds no token is an error: an empty secret file must never open the API.
    """
    environ = os.environ if environ is None else environ
    tokens = parse_tokens_env(environ.get(TOKENS_ENV, ""))
    if tokens_file:
        try:
            text = pathlib.Path(tokens_file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"api_tokens_file: cannot read {tokens_file}: {err}") from None
        from_file = parse_tokens_file(text, tokens_file)
        if not from_file:
            raise ValueError(f"api_tokens_file: {tokens_file} holds no token")
        tokens += from_file
    return frozenset(tokens)


def client_token(token_file: str, environ: dict[str, str] | None = None) -> str | None:
    """The token a client sends: the first one in token_file if named, else $MMSERVE_API_TOKEN, else None."""
    environ = os.environ if environ is None else environ
    if token_file:
        try:
            tokens = parse_tokens_file(pathlib.Path(token_file).read_text(), token_file)
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--token-file: cannot read {token_file}: {err}") from None
        if not tokens:
            raise ValueError(f"--token-file: {token_file} holds no token")
        return tokens[0]
    return environ.get(CLIENT_TOKEN_ENV, "").strip() or None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, else None: exactly the scheme (in any case), one
    space and the token; any other whitespace or a second part makes the value malformed."""
    match = _BEARER.fullmatch(authorization or "")
    return match.group(1) if match else None


class TokenChecker:
    """Checks a request's Authorization value against the configured tokens in constant time."""

    def __init__(self, tokens: frozenset[str] | set[str]):
        self.replace(tokens)

    def replace(self, tokens: frozenset[str] | set[str]) -> None:
        """Accepts exactly these tokens from now on (rotation)."""
        # Digests, so every comparison has one length and the time taken says nothing about a token's length.
        self._digests = [_digest(t) for t in sorted(tokens)]

    @property
    def is_enabled(self) -> bool:
        """Whether any token is configured (no tokens: the API is open)."""
        return bool(self._digests)

    def refusal(self, authorization: str | None) -> str | None:
        """None when the request may pass, else why not (MISSING or INVALID; never which tokens exist)."""
        if not self._digests:
            return None
        token = bearer_token(authorization)
        if token is None:  # a Bearer value that is malformed is an invalid token, anything else none at all
            return INVALID if (authorization or "").lower().startswith("bearer ") else MISSING
        return None if self.matches(token) else INVALID

    def headers_refusal(self, values: Sequence[str]) -> str | None:
        """Like refusal, given every Authorization value a request carried: more than one is refused (DUPLICATE)."""
        if self._digests and len(values) > 1:  # which one would count is a guess an attacker could play with
            return DUPLICATE
        return self.refusal(values[0] if values else None)

    def matches(self, token: str) -> bool:
        """Whether token is one of ours, in constant time."""
        presented = _digest(token)
        # Every configured token is compared, so the time taken does not say which one matched.
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(presented, expected)
        return matched


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# The process's checkers by tokens file: the gRPC API and the HTTP API of one router share one, so one reload
# rotates both.
_checkers: dict[str, TokenChecker] = {}


def shared_checker(tokens_file: str) -> TokenChecker:
    """The process's checker for tokens_file (and the environment), loaded on first use."""
    if tokens_file not in _checkers:
        _checkers[tokens_file] = TokenChecker(load_tokens(tokens_file))
    return _checkers[tokens_file]


def reload_tokens() -> None:
    """Re-reads every tokens file in use (SIGHUP); a file that became unreadable or empty keeps the old tokens."""
    for tokens_file, checker in _checkers.items():
        try:
            tokens = load_tokens(tokens_file)
        except ValueError as err:
            log.error("tokens not reloaded, the previous ones stay: %s", err)
            continue
        if checker.is_enabled and not tokens:  # e.g. MMSERVE_API_TOKENS alone, and the file is not read
            log.error("tokens not reloaded: none left, and a reload never opens an API that had tokens")
            continue
        checker.replace(tokens)
        log.info("reloaded %d API token(s)", len(tokens))
