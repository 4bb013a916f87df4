"""Readable reasons why a server could not be reached or answered oddly, for every command that connects.

A connection that fails says what was tried (the address, plaintext or TLS with which files) and the likely
causes, read from gRPC's last error: nothing listening, a TLS/plaintext mismatch, a missing or foreign client
certificate, or another kind of server."""
from __future__ import annotations

import grpc

from common.tls import ClientTlsOptions

_REFUSED = ("connection refused", "failed to connect to remote host", "no route to host", "name resolution",
            "dns resolution", "network is unreachable")


def describe_security(opts: ClientTlsOptions) -> str:
    """How this end connects, in words."""
    if opts.insecure:
        return "plaintext (--insecure)"
    parts = [f"CA {opts.tls_ca}"]
    if opts.tls_cert:
        parts.append(f"client certificate {opts.tls_cert}")
    if opts.token_file:
        parts.append(f"token file {opts.token_file}")
    return f"TLS ({', '.join(parts)})"


def _causes(what: str, address: str, opts: ClientTlsOptions, last: str) -> list[str]:
    if any(k in last.lower() for k in _REFUSED):
        return [f"nothing listens at {address}: is {what} running, on this host and port?",
                "a firewall between here and there refuses the connection"]
    if opts.insecure:
        return ["the server speaks TLS and this end plaintext: give --tls-ca FILE (and --tls-cert/--tls-key when "
                "it requires client certificates) instead of --insecure",
                f"{address} is not a gRPC server, or a firewall drops the connection"]
    causes = []
    if not opts.tls_cert:
        causes.append("the server requires client certificates (--require-client-cert) and this end gave none: "
                      "give --tls-cert FILE --tls-key FILE")
    causes += ["the server speaks plaintext (--insecure) and this end TLS",
               "--tls-ca is not the CA that signed the server's certificate, or the address's host (or "
               "--tls-server-name) is not one of its names"]
    if opts.tls_cert:
        causes.append("the client certificate is not signed by the CA the server trusts (--tls-ca on the server)")
    return causes


def unreachable(what: str, address: str, opts: ClientTlsOptions, err: grpc.RpcError | None, seconds: float) -> str:
    """Why `what` at `address` did not answer within `seconds`: what was tried and the likely causes."""
    last = f"{err.code().name}: {err.details()}" if err is not None else "no answer"
    within = f" within {seconds:g} s" if seconds > 0 else ""  # 0: one attempt, no retries
    return (f"could not reach {what} at {address} over {describe_security(opts)}{within} (last error: "
            f"{last}). Likely causes: " + "; ".join(_causes(what, address, opts, last)))


def explain_admin_error(err: grpc.RpcError, command: str, address: str, opts: ClientTlsOptions,
                        timeout: float) -> str:
    """An administrative call (status, shutdown) failed: say why in a person's words."""
    code = err.code()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (f"{address} does not serve `{command}` (it answered UNIMPLEMENTED: {err.details()}): it is not a "
                "split server; is it the aggregator (`splitlora-server aggregate`)? `status` and `shutdown` talk to "
                "`splitlora-server serve`; `splitlora-server health` answers for both")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return unreachable("the split server", address, opts, err, timeout)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return (f"the server refused `{command}`: {code.name}: {err.details()} (it needs the admin credential: "
                "admin.pem/admin.key from `splitlora-server certs`, or the token of identity `admin`)")
    return f"the server refused `{command}`: {code.name}: {err.details()}"
