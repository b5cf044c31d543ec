"""Bearer tokens of the public API: where they come from, and a constant-time check of a request's header."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pathlib
import re

# Comma-separated tokens in the environment, so none needs to appear on a command line (visible in `ps`).
TOKENS_ENV = "MMSERVE_API_TOKENS"
# The one token our command-line clients send, when no --token-file names it.
CLIENT_TOKEN_ENV = "MMSERVE_API_TOKEN"
MISSING = "missing bearer token"
INVALID = "invalid bearer token"

log = logging.getLogger(__name__)

# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def parse_tokens_file(text: str, source: str) -> list[str]:
    """The tokens of a file: one per line; blank lines and lines starting with # are skipped."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _TOKEN.fullmatch(line):  # the token itself is never echoed: it may be a real secret
            raise ValueError(f"{source}:{number}: not a bearer token (letters, digits and -._~+/ only, "
                             "one token per line)")
        tokens.append(line)
    return tokens


def parse_tokens_env(value: str, source: str = TOKENS_ENV) -> list[str]:
    """The tokens of a comma-separated list (the environment variable)."""
    tokens = [t.strip() for t in value.split(",") if t.strip()]
    for index, token in enumerate(tokens, 1):
        if not _TOKEN.fullmatch(token):
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
    """The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


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
        if token is None:
            return MISSING
        presented = _digest(token)
        # Every configured token is compared, so the time taken does not say which one matched.
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(presented, expected)
        return None if matched else INVALID


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
