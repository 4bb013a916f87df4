"""Readable reasons why a server could not be reached or answered oddly, for every command that connects."""
from __future__ import annotations

import grpc

_REFUSED = ("connection refused", "failed to connect", "connect failed", "no route to host", "name resolution",
            "dns resolution", "unreachable")
_HANDSHAKE = ("socket closed", "handshake", "ssl", "tls", "certificate", "connection reset", "end of tls",
              "wrong version", "http2 frame", "eof")


def unreachable(what: str, address: str, security: str, err: grpc.RpcError | None, seconds: float) -> str:
    """Why `what` at `address` did not answer within `seconds`, with what was tried and the likely causes.

    `security`: how this end connected, e.g. "TLS (CA ca.pem, client certificate alice.pem)" or "plaintext"."""
    last = f"{err.code().name}: {err.details()}" if err is not None else "no answer"
    text = last.lower()
    plaintext = security == "plaintext"
    if any(k in text for k in _REFUSED):
        causes = [f"nothing listens at {address}: is {what} running, and on this host and port?",
                  "a firewall between here and there drops the connection"]
    elif any(k in text for k in _HANDSHAKE) or err is None or err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        causes = ["the server speaks TLS and this end plaintext (--insecure): give --tls-ca" if plaintext else
                  "the server speaks plaintext (--insecure) and this end TLS, or the other way round",
                  "the server requires a client certificate (--require-client-cert) and this end gave none, or "
                  "one its CA did not sign: give --tls-cert/--tls-key" if not plaintext else
                  f"{address} is another kind of server, or nothing answers there",
                  "--tls-ca is not the CA that signed the server's certificate, or the address's host (or "
                  "--tls-server-name) is not one of its names" if not plaintext else
                  "a firewall drops the connection silently"]
    else:
        causes = [f"is {what} running at {address}?"]
    return (f"could not reach {what} at {address} over {security} within {seconds:g} s (last error: {last}). "
            "Likely causes: " + "; ".join(causes))


def describe_security(opts) -> str:
    """How a ClientTlsOptions end connects, in words."""
    if opts.insecure:
        return "plaintext"
    parts = [f"CA {opts.tls_ca}"]
    if opts.tls_cert:
        parts.append(f"client certificate {opts.tls_cert}")
    if opts.token_file:
        parts.append(f"token file {opts.token_file}")
    return f"TLS ({', '.join(parts)})"
