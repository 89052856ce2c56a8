"""TLS, mutual TLS and per-site tokens for splitfl's gRPC channels.

Security model
--------------
* The server presents a certificate for its DNS names / IP addresses; every
  client checks it against the CA (``ca.crt``). A server whose certificate comes
  from another CA, or does not name the address dialled, is refused.
* Mutual TLS: each hospital (site) presents its client certificate; the server
  refuses a handshake without one or with one from another CA (the client then
  sees ``UNAVAILABLE``).
* Per-site tokens: every call carries two metadata entries,

  ``x-splitfl-site``   the site's name (``site-0``), and
  ``x-splitfl-token``  the site's secret token (``sites/<site>/token``).

  :class:`SiteAuthInterceptor` checks that the SHA-256 of the token matches
  the server's ``tokens.json`` (constant-time comparison) *and* that the TLS
  client certificate names the same site (its CN, and its
  ``urn:splitfl:site:<site>`` URI SAN when it has one), so one site's token is
  useless with another site's certificate and a stolen certificate is useless
  without the token. Failures end the call with ``UNAUTHENTICATED`` before the
  service's handler runs. Handlers can ask :func:`authenticated_site`.
* Plaintext: only with an explicit ``--insecure`` flag
  (:func:`insecure_allowed`), which emits :class:`InsecureChannelWarning`;
  without it :class:`InsecureChannelError` tells the user to run
  ``splitfl certs``.

Make the files with :func:`splitfl.net.certs.make_dev_pki` (``splitfl certs``)
or take them from the hospitals' PKI. Typical use::

    from splitfl.net.certs import load_server_folder, read_token

    own = load_server_folder("pki/server")   # the server's folder alone; refused if it holds a secret
    server = grpc.server(pool, interceptors=[SiteAuthInterceptor(own.tokens)])
    add_server_port(server, "0.0.0.0:50051", server_credentials(own))

    site = site_paths("pki/sites/site-0")
    channel = make_channel("server.example:50051", channel_credentials(site.ca_cert, site.cert, site.key),
                           site=site.site, token=read_token(site.token))

All user-fixable problems raise :class:`splitfl.net.certs.PkiError` (a
``ValueError``) with one clear line.
"""
from __future__ import annotations

import collections
import hmac
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from .certs import (
    SITE_URI_PREFIX,
    PkiError,
    PkiPaths,
    ServerPaths,
    SitePaths,
    hash_token,
    load_pki,
    load_token_hashes,
)

__all__ = [
    "SITE_METADATA_KEY",
    "TOKEN_METADATA_KEY",
    "InsecureChannelError",
    "InsecureChannelWarning",
    "SiteAuthInterceptor",
    "SiteTokenClientInterceptor",
    "add_server_port",
    "authenticated_site",
    "channel_credentials",
    "insecure_allowed",
    "make_channel",
    "peer_site",
    "server_credentials",
    "site_metadata",
    "site_paths",
]

PathLike = Union[str, os.PathLike]
Pem = Union[bytes, str, os.PathLike]  # PEM bytes, or a path to a PEM file

SITE_METADATA_KEY = "x-splitfl-site"
TOKEN_METADATA_KEY = "x-splitfl-token"

_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DUMMY_DIGEST = hash_token("splitfl: no such site")


class InsecureChannelWarning(UserWarning):
    """A plaintext (no TLS, no client authentication) gRPC channel or port is in use."""


class InsecureChannelError(PkiError):
    """Plaintext was requested implicitly (no certificates) without the explicit ``--insecure`` flag."""


# Every insecure start is reported, not only the first one per code location.
warnings.filterwarnings("always", category=InsecureChannelWarning)


# ---------------------------------------------------------------------------
# plaintext only on request


def insecure_allowed(flag: bool, what: str = "gRPC connection") -> bool:
    """Allow plaintext only when the user passed ``--insecure``: warn loudly and return True, else refuse.

    Raises :class:`InsecureChannelError` (telling the user to run
    ``splitfl certs``) when ``flag`` is false.
    """
    if not flag:
        raise InsecureChannelError(
            f"refusing to open a plaintext {what}: no TLS certificates were given. Make a development PKI with "
            "`splitfl certs --out DIR --sites N` (or use your hospitals' certificates) and pass it, "
            "or pass --insecure to accept an unencrypted, unauthenticated connection (development only)"
        )
    warnings.warn(
        f"INSECURE: plaintext {what} (--insecure): no encryption, no server or client authentication; "
        "activations, gradients, model updates and site tokens travel in the clear. Never use this with patient data.",
        InsecureChannelWarning,
        stacklevel=2,
    )
    return True


# ---------------------------------------------------------------------------
# credentials


def _read_pem(src: Pem, what: str) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
        origin = "the bytes given"
    else:
        path = Path(src).expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PkiError(f"{what} file {path} not found (make a development PKI with `splitfl certs`)") from None
        except IsADirectoryError:
            raise PkiError(f"{what} {path} is a folder, not a PEM file") from None
        origin = str(path)
    if b"-----BEGIN " not in data:
        raise PkiError(f"{what} ({origin}) is not PEM (no '-----BEGIN' line)")
    return data


def _server_files(pki: Union[PkiPaths, ServerPaths, PathLike]) -> tuple[Path, Path, Path]:
    """(ca_cert, server_cert, server_key) of a PkiPaths, a ServerPaths, a PKI folder or a server bundle folder."""
    if isinstance(pki, PkiPaths):
        return pki.server_ca_cert, pki.server_cert, pki.server_key
    if isinstance(pki, ServerPaths):
        return pki.ca_cert, pki.cert, pki.key
    folder = Path(pki).expanduser()
    if (folder / "manifest.json").is_file():
        p = load_pki(folder)
        return p.server_ca_cert, p.server_cert, p.server_key
    if (folder / "server.crt").is_file():
        return folder / "ca.crt", folder / "server.crt", folder / "server.key"
    raise PkiError(
        f"{folder} is neither a splitfl PKI folder (manifest.json) nor a server bundle (ca.crt, server.crt, server.key)"
    )


def server_credentials(
    pki: Union[PkiPaths, ServerPaths, PathLike, None] = None,
    require_client_auth: bool = True,
    *,
    ca_cert: Optional[Pem] = None,
    cert: Optional[Pem] = None,
    key: Optional[Pem] = None,
) -> grpc.ServerCredentials:
    """gRPC server credentials: the server certificate and key, and the CA that client certificates must chain to.

    ``pki`` is a :class:`PkiPaths`, a :class:`ServerPaths` (what the splitfl
    servers pass: :func:`splitfl.net.certs.load_server_folder`, which refuses a
    folder holding secrets), a PKI folder (with manifest.json) or a
    server bundle folder (``ca.crt``, ``server.crt``, ``server.key``); the
    keyword arguments override single files (PEM bytes or paths) or replace
    ``pki`` altogether. With ``require_client_auth`` (default) a client
    without a certificate from that CA fails the handshake (mutual TLS).
    """
    files: dict[str, Any] = {"ca_cert": None, "cert": None, "key": None}
    if pki is not None:
        files["ca_cert"], files["cert"], files["key"] = _server_files(pki)
    for name, value in (("ca_cert", ca_cert), ("cert", cert), ("key", key)):
        if value is not None:
            files[name] = value
    if files["cert"] is None or files["key"] is None:
        raise PkiError("server_credentials needs the server certificate and key (a PKI folder, or cert= and key=)")
    if require_client_auth and files["ca_cert"] is None:
        raise PkiError("mutual TLS needs the CA certificate that signs the client certificates (ca_cert=)")
    root = _read_pem(files["ca_cert"], "CA certificate") if files["ca_cert"] is not None else None
    return grpc.ssl_server_credentials(
        [(_read_pem(files["key"], "server private key"), _read_pem(files["cert"], "server certificate"))],
        root_certificates=root,
        require_client_auth=require_client_auth,
    )


def channel_credentials(
    ca_cert: Pem, client_cert: Optional[Pem] = None, client_key: Optional[Pem] = None
) -> grpc.ChannelCredentials:
    """gRPC channel credentials: trust only ``ca_cert`` for the server; present the client certificate if given.

    Each argument is PEM bytes or a path. Give both ``client_cert`` and
    ``client_key`` (mutual TLS) or neither (server-authenticated TLS only).
    """
    if (client_cert is None) != (client_key is None):
        raise PkiError("give both the client certificate and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_cert, "CA certificate"),
        private_key=_read_pem(client_key, "client private key") if client_key is not None else None,
        certificate_chain=_read_pem(client_cert, "client certificate") if client_cert is not None else None,
    )


def site_paths(src: Union[SitePaths, PkiPaths, PathLike], site: Optional[str] = None) -> SitePaths:
    """A hospital's files: from a site folder (``ca.crt``, ``client.crt``, ``client.key``, ``token``) or a PKI and a site name.

    For a site folder the site's name is read from its certificate's CN.
    """
    if isinstance(src, SitePaths):
        return src
    if isinstance(src, PkiPaths):
        if site is None:
            raise PkiError("name the site to take from the PKI")
        return src.site(site)
    folder = Path(src).expanduser()
    if (folder / "manifest.json").is_file():
        if site is None:
            raise PkiError(f"{folder} is a whole PKI: name the site, or pass its sites/<site> folder")
        return load_pki(folder).site(site)
    cert_path = folder / "client.crt"
    pem = _read_pem(cert_path, "client certificate")
    try:
        cn = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as e:
        raise PkiError(f"{cert_path} is not a valid certificate ({e})") from e
    if not cn:
        raise PkiError(f"{cert_path} has no common name (CN) naming the site")
    name = str(cn[0].value)
    if site is not None and site != name:
        raise PkiError(f"{cert_path} belongs to site {name!r}, not {site!r}")
    return SitePaths(name, folder / "ca.crt", cert_path, folder / "client.key", folder / "token")


# ---------------------------------------------------------------------------
# channels and ports


def make_channel(
    target: str,
    credentials: Optional[grpc.ChannelCredentials] = None,
    *,
    insecure: bool = False,
    options: Sequence[tuple[str, Any]] = (),
    site: Optional[str] = None,
    token: Optional[str] = None,
) -> grpc.Channel:
    """A channel to ``target``: TLS with ``credentials``, or plaintext only when ``insecure`` (with a warning).

    With ``site`` and ``token`` every call carries the site's metadata
    (:class:`SiteTokenClientInterceptor`).
    """
    if credentials is not None and insecure:
        raise PkiError("both TLS credentials and --insecure were given; drop one")
    if credentials is None:
        insecure_allowed(insecure, f"gRPC channel to {target}")
        channel = grpc.insecure_channel(target, options=list(options))
    else:
        channel = grpc.secure_channel(target, credentials, options=list(options))
    if site is not None or token is not None:
        if site is None or token is None:
            raise PkiError("give both the site name and its token, or neither")
        channel = grpc.intercept_channel(channel, SiteTokenClientInterceptor(site, token))
    return channel


def add_server_port(
    server: grpc.Server,
    address: str,
    credentials: Optional[grpc.ServerCredentials] = None,
    *,
    insecure: bool = False,
) -> int:
    """Bind ``address`` with TLS ``credentials``, or plaintext only when ``insecure`` (with a warning); the port bound."""
    if credentials is not None and insecure:
        raise PkiError("both TLS credentials and --insecure were given; drop one")
    try:
        if credentials is None:
            insecure_allowed(insecure, f"gRPC server port {address}")
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:  # recent grpcio raises instead of returning 0
        raise PkiError(f"cannot listen on {address}: {e}") from e
    if not port:
        raise PkiError(f"cannot listen on {address} (address in use or invalid)")
    return port


# ---------------------------------------------------------------------------
# per-site tokens: client side


def _check_site_token(site: str, token: str) -> None:
    if not isinstance(site, str) or not _SITE_RE.match(site):
        raise PkiError(f"site name {site!r} is not valid (letters, digits, '.', '_', '-')")
    if not isinstance(token, str) or not token or not token.isascii() or any(c.isspace() for c in token):
        raise PkiError("a site token must be a non-empty ASCII string without whitespace")


def site_metadata(site: str, token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates ``site`` (pass as ``metadata=`` to a call)."""
    _check_site_token(site, token)
    return ((SITE_METADATA_KEY, site), (TOKEN_METADATA_KEY, token))


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class SiteTokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``x-splitfl-site`` and ``x-splitfl-token`` to every call (use with :func:`grpc.intercept_channel`)."""

    def __init__(self, site: str, token: str) -> None:
        self._metadata = site_metadata(site, token)

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        keep = [(k, v) for k, v in (d.metadata or ()) if k not in (SITE_METADATA_KEY, TOKEN_METADATA_KEY)]
        return _CallDetails(
            d.method, d.timeout, keep + list(self._metadata), d.credentials,
            getattr(d, "wait_for_ready", None), getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


# ---------------------------------------------------------------------------
# per-site tokens: server side


def _auth_values(auth: Mapping[str, Sequence[bytes]], key: str) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in auth.get(key, ())]


def peer_site(auth_context: Mapping[str, Sequence[bytes]]) -> Optional[str]:
    """The site a TLS peer's client certificate names, from ``context.auth_context()``; None without one.

    The site is the certificate's CN; a certificate that also carries
    ``urn:splitfl:site:...`` URI SANs must name the same site there, else it
    names no site (None).
    """
    if _auth_values(auth_context, "transport_security_type") != ["ssl"]:
        return None
    cns = _auth_values(auth_context, "x509_common_name")
    if len(cns) != 1:
        return None
    sans = {
        v[len(SITE_URI_PREFIX):]
        for v in _auth_values(auth_context, "x509_subject_alternative_name")
        if v.startswith(SITE_URI_PREFIX)
    }
    if sans and sans != {cns[0]}:
        return None
    return cns[0]


def _metadata_values(metadata: Optional[Iterable[Any]], key: str) -> list[str]:
    out = []
    for item in metadata or ():
        k, v = (item.key, item.value) if hasattr(item, "key") else item
        if k == key:
            out.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
    return out


def authenticated_site(context: grpc.ServicerContext) -> Optional[str]:
    """Inside a handler behind :class:`SiteAuthInterceptor`: the site that made the call.

    The certificate's site when the peer presented one, else (token-only
    mode) the site claimed in the metadata, which the interceptor has checked.
    """
    site = peer_site(context.auth_context())
    if site is not None:
        return site
    claimed = _metadata_values(context.invocation_metadata(), SITE_METADATA_KEY)
    return claimed[0] if len(claimed) == 1 else None


class SiteAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls whose site token or client certificate does not check out (``UNAUTHENTICATED``).

    ``tokens`` is the server's tokens.json (path) or ``{site: sha256 hex}``.
    A call must carry exactly one ``x-splitfl-site`` and one
    ``x-splitfl-token``; the token's SHA-256 must equal the site's entry
    (:func:`hmac.compare_digest`); and, with ``require_peer_cert`` (default),
    the TLS client certificate must name the claimed site
    (:func:`peer_site`). Set ``require_peer_cert=False`` only for
    server-only TLS or ``--insecure`` development runs (token only; a
    certificate, when presented, must still match). Methods in ``exempt``
    (full names such as ``/grpc.health.v1.Health/Check``) skip the checks.

    The TLS peer is only known inside the call's context, which the
    interceptor does not see, so it wraps the handler: the checks run first
    within the call and abort it before the service's behaviour is invoked.
    Request messages are deserialised (by the handler's deserialiser) before
    the checks.
    """

    def __init__(
        self,
        tokens: Union[PathLike, Mapping[str, str]],
        *,
        require_peer_cert: bool = True,
        exempt: Iterable[str] = (),
    ) -> None:
        if isinstance(tokens, Mapping):
            hashes = {str(k): str(v).lower() for k, v in tokens.items()}
            for site, digest in hashes.items():
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise PkiError(f"token hash of site {site!r} is not a SHA-256 hex digest")
        else:
            hashes = load_token_hashes(tokens)
        if not hashes:
            raise PkiError("no site tokens: every call would be refused")
        self._hashes = hashes
        self.require_peer_cert = require_peer_cert
        self.exempt = frozenset(exempt)

    @property
    def sites(self) -> list[str]:
        return list(self._hashes)

    def check(self, metadata: Optional[Iterable[Any]], auth_context: Mapping[str, Sequence[bytes]]) -> tuple[Optional[str], str]:
        """``(site, "")`` when the call is authentic, else ``(None, reason)``."""
        sites = _metadata_values(metadata, SITE_METADATA_KEY)
        tokens = _metadata_values(metadata, TOKEN_METADATA_KEY)
        if not sites or not tokens:
            missing = " and ".join(k for k, v in ((SITE_METADATA_KEY, sites), (TOKEN_METADATA_KEY, tokens)) if not v)
            return None, f"missing {missing} metadata: every call must name its site and carry the site's token"
        if len(sites) > 1 or len(tokens) > 1:
            return None, f"more than one {SITE_METADATA_KEY} or {TOKEN_METADATA_KEY} metadata entry"
        site, token = sites[0], tokens[0]
        expected = self._hashes.get(site)
        good = hmac.compare_digest(hash_token(token), expected if expected is not None else _DUMMY_DIGEST)
        if expected is None or not good:
            return None, f"site {site!r} is unknown or its token is wrong"
        cert_site = peer_site(auth_context)
        if cert_site is None:
            if self.require_peer_cert:
                return None, f"no valid site client certificate on this connection (the call claims site {site!r})"
            if _auth_values(auth_context, "x509_common_name"):
                return None, f"the client certificate names no single site (the call claims site {site!r})"
        elif cert_site != site:
            return None, f"the client certificate belongs to site {cert_site!r} but the call claims site {site!r}"
        return site, ""

    def _guard(self, context: grpc.ServicerContext, metadata: Any) -> None:
        site, reason = self.check(metadata, context.auth_context())
        if site is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"splitfl: {reason}")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.exempt:
            return handler
        md = handler_call_details.invocation_metadata
        guard = self._guard
        des, ser = handler.request_deserializer, handler.response_serializer

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request, context):
                guard(context, md)
                return inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request, context):
                guard(context, md)
                yield from inner_us(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            def stream_unary(request_iterator, context):
                guard(context, md)
                return inner_su(request_iterator, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            def stream_stream(request_iterator, context):
                guard(context, md)
                yield from inner_ss(request_iterator, context)

            return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)
        return handler  # pragma: no cover - a handler with no behaviour at all
