"""Development PKI, TLS / mutual TLS and per-site tokens, over real gRPC servers on 127.0.0.1."""
from __future__ import annotations

import json
import stat
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitfl.net.certs import PkiError, cmd_certs, hash_token, load_pki, load_token_hashes, make_dev_pki, read_token
from splitfl.net.tls import (
    InsecureChannelError,
    InsecureChannelWarning,
    SiteAuthInterceptor,
    add_server_port,
    authenticated_site,
    channel_credentials,
    insecure_allowed,
    make_channel,
    server_credentials,
    site_metadata,
    site_paths,
)

METHOD = "/splitfl.test.Echo/Echo"
STREAM = "/splitfl.test.Echo/Chat"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("pki") / "pki", ["site-0", "site-1"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """An unrelated CA with the same site names: its certificates must be refused everywhere."""
    return make_dev_pki(tmp_path_factory.mktemp("other") / "pki", ["site-0", "site-1"])


def _echo(request: bytes, context) -> bytes:
    return b"%s:%s" % ((authenticated_site(context) or "?").encode(), request)


def _chat(request_iterator, context):
    site = (authenticated_site(context) or "?").encode()
    for r in request_iterator:
        yield site + b":" + r


class _Server:
    def __init__(self, pki_for_server, interceptor=None, **cred_kw):
        self.calls = 0
        outer = self

        def echo(request, context):
            outer.calls += 1
            return _echo(request, context)

        handler = grpc.method_handlers_generic_handler(
            "splitfl.test.Echo",
            {
                "Echo": grpc.unary_unary_rpc_method_handler(echo),
                "Chat": grpc.stream_stream_rpc_method_handler(_chat),
            },
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2), interceptors=[interceptor] if interceptor else []
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = add_server_port(self.server, "127.0.0.1:0", server_credentials(pki_for_server, **cred_kw))
        self.server.start()

    def stop(self):
        self.server.stop(None)


@pytest.fixture(scope="module")
def server(pki):
    s = _Server(pki, SiteAuthInterceptor(pki.tokens))
    yield s
    s.stop()


def _call(port, creds, metadata=None, request=b"ping", method=METHOD, target_host="127.0.0.1"):
    with grpc.secure_channel(f"{target_host}:{port}", creds) as ch:
        return ch.unary_unary(method)(request, timeout=TIMEOUT, metadata=metadata)


def _site_creds(pki, site):
    sp = pki.site(site)
    return channel_credentials(sp.ca_cert, sp.cert, sp.key)


def _md(pki, site):
    return site_metadata(site, read_token(pki.site(site).token))


# ---------------------------------------------------------------------------
# the PKI files


def test_pki_layout_modes_and_certificates(pki):
    root = pki.root
    for rel in ("manifest.json", "ca/ca.crt", "ca/ca.key", "server/ca.crt", "server/server.crt", "server/server.key",
                "server/tokens.json", "sites/site-0/client.crt", "sites/site-0/client.key", "sites/site-0/token",
                "sites/site-1/ca.crt"):
        assert (root / rel).is_file(), rel
    for secret in (pki.ca_key, pki.server_key, pki.tokens, *(p for s in pki.sites.values() for p in (s.key, s.token))):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert not list(root.rglob("*.tmp"))

    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    srv = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    cli = x509.load_pem_x509_certificate(pki.site("site-1").cert.read_bytes())
    assert cli.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-1"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cli.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    cli.verify_directly_issued_by(ca)

    # the server's file holds hashes, never tokens
    hashes = load_token_hashes(pki.tokens)
    tokens = {s: read_token(p.token) for s, p in pki.sites.items()}
    assert hashes == {s: hash_token(t) for s, t in tokens.items()}
    assert tokens["site-0"] != tokens["site-1"] and len(tokens["site-0"]) >= 40
    assert not any(t in pki.tokens.read_text() for t in tokens.values())

    manifest = json.loads(pki.manifest.read_text())
    assert manifest["development_only"] and manifest["ca_fingerprint_sha256"] == pki.ca_fingerprint
    assert load_pki(root) == pki
    assert site_paths(root / "sites" / "site-1") == pki.site("site-1")


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    first = cmd_certs(str(tmp_path / "p"), 1, None, False)
    out = capsys.readouterr()
    assert "development PKI written" in out.out and "DEVELOPMENT certificate authority" in out.err
    with pytest.raises(PkiError, match="refusing to overwrite"):
        cmd_certs(str(tmp_path / "p"), 1, None, False)
    assert load_pki(tmp_path / "p").ca_fingerprint == first.ca_fingerprint  # untouched
    second = cmd_certs(str(tmp_path / "p"), 1, None, True)
    assert second.ca_fingerprint != first.ca_fingerprint
    assert stat.S_IMODE(second.site("site-0").key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "sites, match",
    [(0, "at least one site"), ([], "at least one site"), (["a", "A"], "duplicate"), (["a/b"], "not allowed"),
     (["../x"], "not allowed"), (["a b"], "not allowed"), (["x" * 65], "not allowed"), (True, "count or a list")],
)
def test_bad_sites_are_clear_errors(tmp_path, sites, match):
    with pytest.raises(PkiError, match=match):
        make_dev_pki(tmp_path / "p", sites)
    assert not (tmp_path / "p").exists()


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(PkiError, match="server name"):
        make_dev_pki(tmp_path / "p", 1, server_names=["bad name"])
    with pytest.raises(PkiError, match="days"):
        make_dev_pki(tmp_path / "p", 1, days=0)
    with pytest.raises(PkiError, match="disagrees"):
        cmd_certs(str(tmp_path / "p"), 3, ["a", "b"], False)
    with pytest.raises(PkiError, match="no manifest"):
        load_pki(tmp_path)
    with pytest.raises(PkiError, match="not found"):
        channel_credentials(tmp_path / "missing.crt")


# ---------------------------------------------------------------------------
# mutual TLS and tokens over real gRPC


def test_mtls_with_site_cert_and_token(server, pki):
    assert _call(server.port, _site_creds(pki, "site-0"), _md(pki, "site-0")) == b"site-0:ping"
    assert _call(server.port, _site_creds(pki, "site-1"), _md(pki, "site-1"), target_host="localhost") == b"site-1:ping"
    # the helper channel (client interceptor adds the metadata), streaming too
    sp = site_paths(pki.root / "sites" / "site-1")
    with make_channel(f"127.0.0.1:{server.port}", channel_credentials(sp.ca_cert, sp.cert, sp.key),
                      site=sp.site, token=read_token(sp.token)) as ch:
        assert ch.unary_unary(METHOD)(b"x", timeout=TIMEOUT) == b"site-1:x"
        assert list(ch.stream_stream(STREAM)(iter([b"a", b"b"]), timeout=TIMEOUT)) == [b"site-1:a", b"site-1:b"]


def test_client_without_certificate_is_refused(server, pki):
    with pytest.raises(grpc.RpcError) as e:
        _call(server.port, channel_credentials(pki.site("site-0").ca_cert), _md(pki, "site-0"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(server, pki, other_pki):
    other = other_pki.site("site-0")
    creds = channel_credentials(pki.ca_cert, other.cert, other.key)  # trusts the right server, wrong client CA
    with pytest.raises(grpc.RpcError) as e:
        _call(server.port, creds, _md(pki, "site-0"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("case", ["wrong-token", "missing-token", "missing-site", "other-sites-token", "unknown-site"])
def test_bad_tokens_are_unauthenticated_and_server_keeps_serving(server, pki, case):
    tok0, tok1 = (read_token(pki.site(s).token) for s in ("site-0", "site-1"))
    metadata = {
        "wrong-token": site_metadata("site-0", tok0[:-2] + "xx"),
        "missing-token": (("x-splitfl-site", "site-0"),),
        "missing-site": (("x-splitfl-token", tok0),),
        # site-0's cert with site-1's (valid) name and token: the certificate must match the claimed site
        "other-sites-token": site_metadata("site-1", tok1),
        "unknown-site": site_metadata("site-9", tok0),
    }[case]
    before = server.calls
    with pytest.raises(grpc.RpcError) as e:
        _call(server.port, _site_creds(pki, "site-0"), metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details().startswith("splitfl: ")
    if case == "other-sites-token":
        assert "belongs to site 'site-0'" in e.value.details()
    assert server.calls == before  # the handler never ran
    with pytest.raises(grpc.RpcError) as e:  # streaming methods are guarded too
        with grpc.secure_channel(f"127.0.0.1:{server.port}", _site_creds(pki, "site-0")) as ch:
            list(ch.stream_stream(STREAM)(iter([b"a"]), timeout=TIMEOUT, metadata=metadata))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _call(server.port, _site_creds(pki, "site-0"), _md(pki, "site-0")) == b"site-0:ping"
    assert server.calls == before + 1


def test_client_checks_the_server_certificate(pki, other_pki):
    rogue = _Server(other_pki, SiteAuthInterceptor(other_pki.tokens))  # server cert from another CA
    try:
        with pytest.raises(grpc.RpcError) as e:
            _call(rogue.port, _site_creds(pki, "site-0"), _md(pki, "site-0"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert rogue.calls == 0
    finally:
        rogue.stop()


def test_server_name_must_match(tmp_path, pki):
    """A server certificate valid only for another name is refused even from the right CA."""
    elsewhere = make_dev_pki(tmp_path / "p", 1, server_names=["db.example.org"])
    s = _Server(elsewhere, SiteAuthInterceptor(elsewhere.tokens))
    try:
        with pytest.raises(grpc.RpcError) as e:
            _call(s.port, _site_creds(elsewhere, "site-0"), _md(elsewhere, "site-0"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


# ---------------------------------------------------------------------------
# plaintext only on request


def test_insecure_requires_the_flag_and_warns(pki):
    with pytest.raises(InsecureChannelError, match="splitfl certs"):
        insecure_allowed(False)
    with pytest.raises(InsecureChannelError, match="--insecure"):
        make_channel("127.0.0.1:1")
    with pytest.warns(InsecureChannelWarning, match="INSECURE"):
        assert insecure_allowed(True)
    with pytest.raises(PkiError, match="drop one"):
        make_channel("127.0.0.1:1", _site_creds(pki, "site-0"), insecure=True)

    # end to end: plaintext server and channel with --insecure, tokens only (no certificate to match)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1),
                         interceptors=[SiteAuthInterceptor(pki.tokens, require_peer_cert=False)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "splitfl.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
    with pytest.raises(InsecureChannelError):
        add_server_port(server, "127.0.0.1:0")
    with pytest.warns(InsecureChannelWarning):
        port = add_server_port(server, "127.0.0.1:0", insecure=True)
    server.start()
    try:
        with pytest.warns(InsecureChannelWarning):
            ch = make_channel(f"127.0.0.1:{port}", insecure=True)
        with ch:
            assert ch.unary_unary(METHOD)(b"p", timeout=TIMEOUT, metadata=_md(pki, "site-1")) == b"site-1:p"
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(METHOD)(b"p", timeout=TIMEOUT, metadata=site_metadata("site-1", "nope"))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)

    # the default interceptor (certificates required) refuses plaintext callers even with a good token
    interceptor = SiteAuthInterceptor(pki.tokens)
    site, reason = interceptor.check(_md(pki, "site-0"), {})
    assert site is None and "client certificate" in reason
