"""The stack's internal credential: one shared token that every call between services carries, checked by the stages."""

from __future__ import annotations

import secrets

import grpc

from mmserve import auth

# A header of its own, not `authorization`: on the router's port the public API keeps the clients' bearer tokens,
# and a client token can never be mistaken for the internal one (or the other way round).
HEADER = "mmserve-internal-token"
MISSING = "missing internal token"
INVALID = "invalid internal token"
DUPLICATE = "more than one internal token"


def generate() -> str:
    """A fresh random token (what `mmserve up` and `mmserve secrets` write)."""
    return secrets.token_urlsafe(32)


def load(token_file: str) -> str | None:
    """The internal token of internal_token_file, or None when it is not set."""
    if not token_file:
        return None
    token = auth.read_secret("internal_token_file", token_file)
    if not auth.is_bearer_token(token):
        raise ValueError(f"internal_token_file: {token_file} is not a token (letters, digits and -._~+/ only)")
    return token


def refusal(checker: auth.TokenChecker, metadata) -> str | None:
    """None when a call's metadata carries exactly one internal token and it is ours, else why not."""
    values = [value for key, value in metadata or () if key == HEADER]
    if not values:
        return MISSING
    if len(values) > 1:
        return DUPLICATE
    return None if checker.matches(values[0]) else INVALID


_token: str | None = None


def install(token: str | None) -> None:
    """Makes token what this process's channels to other services send (rpc.install_credentials does it)."""
    global _token
    _token = token


def client_interceptors() -> list:
    """Channel interceptors adding the installed token to every call (none when no token is installed)."""
    if _token is None:
        return []
    return [kind(_token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


class _AddToken:
    def __init__(self, token: str):
        self.token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        # A new Metadata: the caller's object may be shared between calls.
        metadata = grpc.aio.Metadata(*(details.metadata or ()), (HEADER, self.token))
        return details._replace(metadata=metadata)


class _UnaryUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnary(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)
