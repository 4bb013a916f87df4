"""Who is calling, and may they: identities from mTLS certificates or bearer tokens, checked on every call.

One `Authenticator` serves both servicers. An interceptor refuses every SplitLoRA call without a valid
credential (UNAUTHENTICATED) and administrative calls without the admin credential (PERMISSION_DENIED)
before any handler runs; handlers then check that the client id a call names is the caller's own
(`check_client`). When no identity source is configured (no client certificates, no tokens file),
every caller is anonymous and may act as any client id: the server warns about it at start.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import grpc

from common.tls import AUTHORIZATION_KEY, BEARER
from splitlora_server.errors import Refused, abort
from splitlora_server.ops.tokens import TokenStore

log = logging.getLogger(__name__)
ADMIN_ID = "admin"
URI_PREFIX = "urn:splitlora:"
_SAN_KEY = "x509_subject_alternative_name"
_CN_KEY = "x509_common_name"
# Calls that need the admin credential; every other SplitLoRA call needs some valid credential.
ADMIN_METHODS = frozenset({"/splitlora.v1.SplitTraining/Status", "/splitlora.v1.SplitTraining/Shutdown"})
PROTECTED_PREFIX = "/splitlora.v1."


def identity_uri(identity: str) -> str:
    """The URI subject alternative name that carries an identity in a certificate."""
    return URI_PREFIX + identity


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    name: str
    via: str  # "certificate" or "token"

    @property
    def is_admin(self) -> bool:
        """True for the admin credential."""
        return self.name == ADMIN_ID


class AccessDenied(Refused):
    """A call the caller may not make; `code` is UNAUTHENTICATED or PERMISSION_DENIED."""


def _text(values: list[bytes]) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def certificate_identity(auth_context: dict) -> str | None:
    """The identity in a verified peer certificate: its `urn:splitlora:` URI name, else its common name."""
    uris = [s.removeprefix(URI_PREFIX) for s in _text(auth_context.get(_SAN_KEY, [])) if s.startswith(URI_PREFIX)]
    if uris:
        return uris[0]
    names = _text(auth_context.get(_CN_KEY, []))
    return names[0] if names else None


class Authenticator:
    """Finds the caller's identity (certificate first, then bearer token) and applies the access rules."""

    def __init__(self, tokens: TokenStore | None = None, certificates: bool = False) -> None:
        self.tokens, self.certificates = tokens, certificates

    @property
    def enabled(self) -> bool:
        """True when callers must prove an identity."""
        return self.certificates or self.tokens is not None

    def identify(self, context: grpc.ServicerContext) -> Identity | None:
        """The caller's identity; AccessDenied(UNAUTHENTICATED) for a bearer token that is not valid."""
        if self.certificates and context.auth_context().get(_CN_KEY):
            name = certificate_identity(context.auth_context())
            if name:
                return Identity(name, "certificate")
        if self.tokens is None:
            return None
        header = next((v for k, v in context.invocation_metadata() if k == AUTHORIZATION_KEY), None)
        if header is None:
            return None
        if not isinstance(header, str) or not header.startswith(BEARER):
            raise AccessDenied(grpc.StatusCode.UNAUTHENTICATED,
                               f"the {AUTHORIZATION_KEY} metadata must be '{BEARER}<token>'")
        name = self.tokens.identity_of(header[len(BEARER):].strip())
        if name is None:
            raise AccessDenied(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid here (unknown or "
                                                                "revoked); ask the operator for a token")
        return Identity(name, "token")

    def authenticate(self, context: grpc.ServicerContext) -> Identity | None:
        """The caller's identity; AccessDenied(UNAUTHENTICATED) when one is required and none was given."""
        identity = self.identify(context)
        if identity is None and self.enabled:
            how = " or ".join(w for w, on in (("a client certificate", self.certificates),
                                              ("a bearer token (--token-file)", self.tokens is not None)) if on)
            raise AccessDenied(grpc.StatusCode.UNAUTHENTICATED, f"no credential: this server needs {how}")
        return identity

    def check_client(self, context: grpc.ServicerContext, client_id: str) -> None:
        """A caller may act only as itself, and the admin credential is not a client."""
        identity = self.authenticate(context)
        if identity is None:
            return
        if identity.is_admin:
            raise AccessDenied(grpc.StatusCode.PERMISSION_DENIED, "the admin credential is for administrative "
                                                                  "calls; a client needs its own credential")
        if client_id != identity.name:
            raise AccessDenied(grpc.StatusCode.PERMISSION_DENIED,
                               f"authenticated as {identity.name!r} (by {identity.via}) but acting as client "
                               f"{client_id!r}: a client may only act as itself")

    def check_admin(self, context: grpc.ServicerContext) -> None:
        """Administrative calls need the admin credential (when identities are configured)."""
        identity = self.authenticate(context)
        if identity is not None and not identity.is_admin:
            raise AccessDenied(grpc.StatusCode.PERMISSION_DENIED,
                               f"{identity.name!r} may not make administrative calls; use the admin credential")


def build_authenticator(tokens_file: str, certificates: bool, role: str) -> Authenticator:
    """The authenticator of a serving role; warns when it has no way to tell clients apart."""
    auth = Authenticator(TokenStore.load(tokens_file) if tokens_file else None, certificates)
    if not auth.enabled:
        log.warning("%s has no client identities (neither --require-client-cert nor --tokens-file): any caller "
                    "can join, train, submit and fetch as any client id and make administrative calls", role)
    return auth


def _guarded(handler: grpc.RpcMethodHandler, check: Callable[[grpc.ServicerContext], None]) -> grpc.RpcMethodHandler:
    """The same handler, running `check(context)` before its behaviour."""
    kinds = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
             (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
             (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
             (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler)}
    attribute, factory = kinds[(handler.request_streaming, handler.response_streaming)]
    behaviour = getattr(handler, attribute)

    def guarded(request, context: grpc.ServicerContext):
        check(context)
        return behaviour(request, context)

    return factory(guarded, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.ServerInterceptor):
    """Deny by default: every SplitLoRA method needs a credential, admin methods the admin one."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler  # unknown methods (UNIMPLEMENTED) and the health service stay as they are
        auth = self.authenticator
        rule = auth.check_admin if details.method in ADMIN_METHODS else auth.authenticate

        def check(context: grpc.ServicerContext) -> None:
            abort_if_denied(context, lambda: rule(context), details.method)

        return _guarded(handler, check)


def abort_if_denied(context: grpc.ServicerContext, check: Callable[[], None], call: str = "a call") -> None:
    """Run an access check in a handler or interceptor; a refusal is logged and becomes the call's status."""
    try:
        check()
    except AccessDenied as denied:
        log.warning("refused %s from %s: %s", call, context.peer(), denied.message)
        abort(context, denied)
