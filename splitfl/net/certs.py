"""A development PKI for splitfl's gRPC deployment: one CA, a server certificate,
one client certificate and one secret token per hospital (site).

This is for development, tests and pilots only. A real deployment uses
certificates issued by the hospitals' own PKI; :mod:`splitfl.net.tls` accepts
any PEM files, not only the ones made here.

:func:`make_dev_pki` writes::

    DIR/
      manifest.json          paths (relative to DIR), server names, sites, CA fingerprint, expiry
      ca/ca.crt              the CA certificate (public; every party trusts it)
      ca/ca.key       0600   the CA private key: keep offline, never copy to a server or a site
      server/                copy this folder to the server: it is all the server needs (--pki DIR/server)
        ca.crt               trust root for the hospitals' client certificates
        server.crt           SANs: the DNS names and IP addresses given (serverAuth)
        server.key    0600
        tokens.json   0600   {"sites": {site: sha256-hex of its token}}: hashes only, no tokens
        consortium.public    fed.secure he: the consortium's PUBLIC CKKS context (`splitfl keys`)
      sites/<site>/          copy each folder to its hospital only: all it needs (--pki DIR/sites/<site>)
        ca.crt               trust root for the server's certificate
        client.crt           CN=<site>, SAN URI urn:splitfl:site:<site> (clientAuth)
        client.key    0600
        token         0600   the site's secret token (one line)
        consortium.secret 0600  the hospitals' shared key (`splitfl keys`: CKKS secret context, or
                             relay.secret in split-plain); a copy stays at DIR/ for the administrator

A server refuses a folder that holds anything secret it must not have (the CA
key, a consortium secret, a site's key or token): :func:`load_server_folder`.

Every file is written atomically (temporary file in the same folder, then
:func:`os.replace`); private keys and tokens are created with mode 0600 and
never readable by others, even for an instant. An existing PKI is never
overwritten unless ``overwrite=True``. The manifest is written last, so a
PKI without one was interrupted and is incomplete.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import ipaddress
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitfl.artifacts import write_bytes
from splitfl.errors import UserError

__all__ = [
    "DEFAULT_DAYS",
    "DEFAULT_SERVER_NAMES",
    "PkiError",
    "PkiPaths",
    "ServerPaths",
    "SitePaths",
    "cmd_certs",
    "fingerprint",
    "hash_token",
    "load_pki",
    "load_server_folder",
    "load_token_hashes",
    "make_dev_pki",
    "read_token",
    "site_uri",
]

PathLike = Union[str, os.PathLike]

DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
MAX_DAYS = 3650
MANIFEST_FORMAT = "splitfl-dev-pki"
MANIFEST_VERSION = 1
TOKENS_FORMAT = "splitfl-site-tokens"
SITE_URI_PREFIX = "urn:splitfl:site:"

# Site names end up in a certificate CN (at most 64 characters), a folder name
# and gRPC metadata: letters, digits, '.', '_' and '-', starting with a letter or digit.
_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PkiError(UserError, ValueError):
    """A user-fixable problem with a PKI folder or with the arguments to make one."""


@dataclasses.dataclass(frozen=True)
class SitePaths:
    """What one hospital needs: the CA to check the server, its client certificate and key, its token."""

    site: str
    ca_cert: Path
    cert: Path
    key: Path
    token: Path


@dataclasses.dataclass(frozen=True)
class PkiPaths:
    """Absolute paths of a PKI folder written by :func:`make_dev_pki` (see the module docstring)."""

    root: Path
    manifest: Path
    ca_cert: Path
    ca_key: Path
    server_ca_cert: Path
    server_cert: Path
    server_key: Path
    tokens: Path
    sites: dict[str, SitePaths]
    ca_fingerprint: str
    server_names: tuple[str, ...]

    @property
    def site_names(self) -> list[str]:
        return list(self.sites)

    def site(self, name: str) -> SitePaths:
        try:
            return self.sites[name]
        except KeyError:
            raise PkiError(f"no site {name!r} in the PKI at {self.root} (sites: {', '.join(self.sites)})") from None


# ---------------------------------------------------------------------------
# small helpers


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a token, as stored in the server's tokens.json."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate as colon-separated upper-case hex (as ``openssl x509 -fingerprint`` prints)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def site_uri(site: str) -> str:
    """The URI SAN that names a site in its client certificate."""
    return SITE_URI_PREFIX + site


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_site_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    if not names:
        raise PkiError("at least one site is needed (got 0)")
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _SITE_RE.match(name):
            raise PkiError(
                f"site name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (it becomes a certificate CN, a folder name and gRPC metadata)"
            )
        if name.lower() in seen:  # case-insensitive file systems would merge the folders
            raise PkiError(f"duplicate site name {name!r} (site names must be unique, ignoring case)")
        seen[name.lower()] = name
    return names


def _site_names(sites: Union[int, Sequence[str]]) -> list[str]:
    if isinstance(sites, bool):
        raise PkiError(f"sites must be a count or a list of names, got {sites!r}")
    if isinstance(sites, int):
        if sites < 1:
            raise PkiError(f"at least one site is needed (got {sites})")
        if sites > 10_000:
            raise PkiError(f"{sites} sites is more than a development PKI supports (10000)")
        return [f"site-{i}" for i in range(sites)]
    if isinstance(sites, str):
        raise PkiError(f"sites must be a count or a list of names, got the string {sites!r}")
    return _check_site_names(sites)


def _parse_server_names(names: Iterable[str]) -> tuple[list[str], list[ipaddress._BaseAddress]]:
    dns: list[str] = []
    ips: list[ipaddress._BaseAddress] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise PkiError(f"server name {name!r} is not a DNS name or an IP address")
        try:
            ip = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            labels = name.rstrip(".").split(".")
            if len(name) > 253 or not all(_DNS_LABEL_RE.match(lbl) for lbl in labels):
                raise PkiError(f"server name {name!r} is not a DNS name or an IP address") from None
            if name.lower() not in (d.lower() for d in dns):
                dns.append(name.rstrip("."))
        else:
            if ip not in ips:
                ips.append(ip)
    if not dns and not ips:
        raise PkiError("at least one server name (DNS name or IP address) is needed")
    return dns, ips


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitfl development PKI"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _leaf_builder(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    not_before: _dt.datetime,
    not_after: _dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )


# ---------------------------------------------------------------------------
# the PKI


def _layout(root: Path, sites: Sequence[str]) -> dict[str, object]:
    """Relative paths of every file of a PKI (the manifest's ``paths`` and ``sites`` entries)."""
    return {
        "paths": {
            "ca_cert": "ca/ca.crt",
            "ca_key": "ca/ca.key",
            "server_ca_cert": "server/ca.crt",
            "server_cert": "server/server.crt",
            "server_key": "server/server.key",
            "tokens": "server/tokens.json",
        },
        "sites": {
            s: {
                "ca_cert": f"sites/{s}/ca.crt",
                "cert": f"sites/{s}/client.crt",
                "key": f"sites/{s}/client.key",
                "token": f"sites/{s}/token",
            }
            for s in sites
        },
    }


def make_dev_pki(
    out_dir: PathLike,
    sites: Union[int, Sequence[str]],
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> PkiPaths:
    """Make a development CA, a server certificate and one client certificate and token per site in ``out_dir``.

    ``sites`` is a count (names ``site-0``, ``site-1``, ...) or a list of names.
    ``server_names`` are the DNS names and IP addresses the server certificate
    is valid for (clients check them). Certificates are valid for ``days``
    days (the CA for as long). Raises :class:`PkiError` for bad arguments and
    when ``out_dir`` already holds a PKI and ``overwrite`` is false.
    """
    names = _site_names(sites)
    if isinstance(server_names, str):
        server_names = [server_names]
    dns, ips = _parse_server_names(server_names)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise PkiError(f"days must be a whole number from 1 to {MAX_DAYS}, got {days!r}")

    root = Path(out_dir).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise PkiError(f"{root} exists and is not a folder")
    layout = _layout(root, names)
    targets = [root / "manifest.json"] + [root / p for p in layout["paths"].values()]  # type: ignore[union-attr]
    for entry in layout["sites"].values():  # type: ignore[union-attr]
        targets += [root / p for p in entry.values()]
    existing = [p for p in targets if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise PkiError(
            f"{root} already holds a PKI ({existing[0].relative_to(root)} exists); "
            "refusing to overwrite it: choose another folder or pass overwrite (--overwrite) to replace it"
        )

    # Everything is generated in memory first, then written.
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    not_before = now - _dt.timedelta(minutes=5)  # tolerate small clock skew between machines
    not_after = now + _dt.timedelta(days=days)

    ca_key = _new_key()
    ca_name = _name("splitfl development CA", "certificate authority")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = _new_key()
    san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ip) for ip in ips]
    server_cert = (
        _leaf_builder(_name((dns or [str(ips[0])])[0], "server"), server_key, ca_cert, ca_key, not_before, not_after)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    site_material: dict[str, tuple[bytes, bytes, str]] = {}
    for site in names:
        key = _new_key()
        cert = (
            _leaf_builder(_name(site, "site"), key, ca_cert, ca_key, not_before, not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(site_uri(site))]), critical=False
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        site_material[site] = (_cert_pem(cert), _key_pem(key), secrets.token_urlsafe(32))

    ca_pem = _cert_pem(ca_cert)
    ca_fp = fingerprint(ca_cert)
    tokens_doc = {
        "format": TOKENS_FORMAT,
        "version": 1,
        "hash": "sha256",
        "ca_fingerprint_sha256": ca_fp,
        "sites": {s: hash_token(tok) for s, (_, _, tok) in site_material.items()},
    }

    root.mkdir(parents=True, exist_ok=True)
    if overwrite and (root / "manifest.json").exists():
        # The old manifest goes first: a crash below leaves no manifest that points at mixed files.
        os.unlink(root / "manifest.json")
    p = {k: root / v for k, v in layout["paths"].items()}  # type: ignore[union-attr]
    write_bytes(p["ca_key"], _key_pem(ca_key), 0o600)
    write_bytes(p["ca_cert"], ca_pem, 0o644)
    write_bytes(p["server_key"], _key_pem(server_key), 0o600)
    write_bytes(p["server_cert"], _cert_pem(server_cert), 0o644)
    write_bytes(p["server_ca_cert"], ca_pem, 0o644)
    write_bytes(p["tokens"], (json.dumps(tokens_doc, indent=2) + "\n").encode(), 0o600)
    for site, (cert_pem, key_pem, token) in site_material.items():
        sp = {k: root / v for k, v in layout["sites"][site].items()}  # type: ignore[index]
        write_bytes(sp["key"], key_pem, 0o600)
        write_bytes(sp["token"], (token + "\n").encode(), 0o600)
        write_bytes(sp["cert"], cert_pem, 0o644)
        write_bytes(sp["ca_cert"], ca_pem, 0o644)
    for folder in {root / "ca", root / "server", root / "sites", *((root / "sites" / s) for s in names)}:
        _fsync_dir(folder)

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "development_only": True,
        "created": now.isoformat(),
        "not_after": not_after.isoformat(),
        "key_type": "EC P-256",
        "ca_fingerprint_sha256": ca_fp,
        "server_names": [*dns, *(str(ip) for ip in ips)],
        **layout,
    }
    write_bytes(root / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode(), 0o644)
    _fsync_dir(root)
    return load_pki(root)


def load_pki(root: PathLike) -> PkiPaths:
    """The :class:`PkiPaths` of a folder written by :func:`make_dev_pki` (read from its manifest.json)."""
    root = Path(root).expanduser().absolute()
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise PkiError(
            f"{root} holds no splitfl PKI (no manifest.json); make one with `splitfl certs --out {root} --sites N`"
        )
    try:
        doc = json.loads(mpath.read_text())
        if doc.get("format") != MANIFEST_FORMAT:
            raise PkiError(f"{mpath} is not a splitfl PKI manifest (format {doc.get('format')!r})")
        if doc.get("version") != MANIFEST_VERSION:
            raise PkiError(f"{mpath} has manifest version {doc.get('version')!r}; this splitfl reads {MANIFEST_VERSION}")
        paths = {k: root / v for k, v in doc["paths"].items()}
        sites = {
            s: SitePaths(s, root / e["ca_cert"], root / e["cert"], root / e["key"], root / e["token"])
            for s, e in doc["sites"].items()
        }
        return PkiPaths(
            root=root,
            manifest=mpath,
            ca_cert=paths["ca_cert"],
            ca_key=paths["ca_key"],
            server_ca_cert=paths["server_ca_cert"],
            server_cert=paths["server_cert"],
            server_key=paths["server_key"],
            tokens=paths["tokens"],
            sites=sites,
            ca_fingerprint=str(doc["ca_fingerprint_sha256"]),
            server_names=tuple(doc.get("server_names", ())),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, PkiError):
            raise
        raise PkiError(f"{mpath} is not a valid splitfl PKI manifest ({type(e).__name__}: {e})") from e


def load_token_hashes(path: PathLike) -> dict[str, str]:
    """``{site: sha256 hex of its token}`` from a server's tokens.json."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PkiError(f"tokens file {path} not found (it is server/tokens.json of a `splitfl certs` folder)") from None
    except ValueError as e:
        raise PkiError(f"tokens file {path} is not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != TOKENS_FORMAT or doc.get("hash") != "sha256":
        raise PkiError(f"{path} is not a splitfl tokens file (expected format {TOKENS_FORMAT!r} with sha256 hashes)")
    sites = doc.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise PkiError(f"tokens file {path} lists no sites")
    out: dict[str, str] = {}
    for site, digest in sites.items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise PkiError(f"tokens file {path}: the entry for site {site!r} is not a SHA-256 hex digest")
        out[str(site)] = digest
    return out


def read_token(path: PathLike) -> str:
    """A site's token from its token file (surrounding whitespace removed)."""
    path = Path(path)
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise PkiError(f"token file {path} not found (it is sites/<site>/token of a `splitfl certs` folder)") from None
    if not token or any(c.isspace() for c in token):
        raise PkiError(f"token file {path} does not hold one token")
    return token


# ---------------------------------------------------------------------------
# the server's own folder (DIR/server), and nothing more


SERVER_FILES: tuple[str, ...] = ("ca.crt", "server.crt", "server.key", "tokens.json")
# First bytes of a file written by splitfl.he.keys.save_secret_context (its _SECRET_MAGIC), so a consortium
# secret context is recognised whatever it is called, without importing TenSEAL here.
SECRET_CONTEXT_PREFIX = b"SPLITFL-CKKS-SECRET-CONTEXT"
MAX_SERVER_FOLDER_FILES = 1000  # a server folder holds a handful; more means a wrong folder (say, a home dir)
_PEM_SNIFF_BYTES = 1 << 20  # PEM private keys are a few KB; larger files are not read for them


@dataclasses.dataclass(frozen=True)
class ServerPaths:
    """What one server needs, all in its own folder: its certificate and key, the CA, the sites' token hashes."""

    root: Path
    ca_cert: Path
    cert: Path
    key: Path
    tokens: Path


def _secret_reason(path: Path, folder: Path) -> Optional[str]:
    """Why ``path`` (a file under a server's folder) is a secret the server must not hold, or None."""
    name = path.name
    if name == "ca.key":
        return "the CA private key, to keep offline"
    if name.endswith(".secret"):
        return "a consortium secret, the hospitals' shared key"
    if name == "token":
        return "a site's token; the server holds only their hashes, tokens.json"
    if path.suffix == ".key" and path != folder / "server.key":
        return "a private key other than this folder's server.key"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_PEM_SNIFF_BYTES if size <= _PEM_SNIFF_BYTES else len(SECRET_CONTEXT_PREFIX))
    except OSError:
        return None
    if head.startswith(SECRET_CONTEXT_PREFIX):
        return "a consortium secret context, which can decrypt"
    if b"PRIVATE KEY-----" in head and path != folder / "server.key":
        return "a private key other than this folder's server.key"
    return None


def _is_ca_key(key_path: Path, ca_cert_path: Path) -> bool:
    """server.key is in fact the CA's private key (copied over the server's by mistake)."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    except (OSError, ValueError, TypeError):
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == ca.public_key().public_bytes(*fmt)


def load_server_folder(folder: PathLike, require_tls: bool = True) -> ServerPaths:
    """The server's own folder (``DIR/server`` of :func:`make_dev_pki`), refused if it holds a secret.

    A server needs only ``ca.crt``, ``server.crt``, ``server.key``, ``tokens.json`` (and, under
    ``fed.secure: he``, ``consortium.public``). Handing it more (the whole PKI with the CA key, a
    consortium secret, a site's key or token) would let a compromised server mint certificates,
    decrypt or impersonate a hospital, so every file under the folder is checked and the first
    offenders are named in a :class:`PkiError`. ``require_tls``: the certificate files must be
    there too (not needed for an ``--insecure`` development server, which checks tokens only).
    """
    root = Path(folder).expanduser().absolute()
    if not root.is_dir():
        raise PkiError(f"server folder {root} {'is not a folder' if root.exists() else 'does not exist'}: pass the "
                       "server's own folder made by `splitfl certs --out DIR` (DIR/server)")
    whole_pki = (root / "manifest.json").is_file()
    found: list[tuple[int, str]] = []  # (rank: the worst first, "path: why")
    seen = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            seen += 1
            if seen > MAX_SERVER_FOLDER_FILES:
                raise PkiError(f"{root} holds more than {MAX_SERVER_FOLDER_FILES} files: it is not a server's folder; "
                               "pass the one made by `splitfl certs --out DIR` (DIR/server)")
            path = Path(dirpath) / name
            reason = _secret_reason(path, root) if path.is_file() else None
            if reason is not None:
                rank = next(i for i, w in enumerate(("CA", "consortium", "token", "")) if w in reason)
                found.append((rank, f"{path.relative_to(root)}: {reason}"))
    if not found and (root / "server.key").is_file() and _is_ca_key(root / "server.key", root / "ca.crt"):
        found.append((0, "server.key: it is the CA private key, not the server's"))
    if found:
        found = sorted(found)
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        todo = (f"pass the server's own folder instead: --pki {root / 'server'}" if whole_pki else
                "copy only the server's folder of `splitfl certs` (and consortium.public from `splitfl keys`) to the "
                "server, and remove those files from it")
        raise PkiError(f"refusing to serve from {root}: it holds secrets a server must never have: "
                       f"{'; '.join(f for _, f in found[:3])}{more}. A server needs only {', '.join(SERVER_FILES)} "
                       f"(and consortium.public under fed.secure he); {todo}")
    needed = SERVER_FILES if require_tls else ("tokens.json",)
    missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        hint = (f"it is a whole PKI folder: pass its server folder, --pki {root / 'server'}" if whole_pki else
                "pass the server's own folder made by `splitfl certs --out DIR` (DIR/server)")
        raise PkiError(f"server folder {root} lacks {', '.join(missing)}; {hint}")
    return ServerPaths(root, root / "ca.crt", root / "server.crt", root / "server.key", root / "tokens.json")


# ---------------------------------------------------------------------------
# CLI entry: ``splitfl certs --out DIR --sites N [--names a,b] [--overwrite]``


def cmd_certs(out: str, sites: Optional[int], names: Optional[list[str]] = None, overwrite: bool = False) -> PkiPaths:
    """Make a development PKI in ``out`` and print what was made. Raises :class:`PkiError` on bad input.

    With ``names`` the sites are named explicitly; ``sites`` may then be None
    or must equal ``len(names)``.
    """
    if names:
        if sites is not None and sites != len(names):
            raise PkiError(f"--sites {sites} disagrees with the {len(names)} names given; give one or make them agree")
        spec: Union[int, list[str]] = list(names)
    else:
        if sites is None:
            raise PkiError("give the number of sites (--sites N) or their names")
        spec = sites
    pki = make_dev_pki(out, spec, overwrite=overwrite)
    print(f"development PKI written to {pki.root}")
    print(f"  CA certificate   {pki.ca_cert}")
    print(f"  CA fingerprint   SHA256 {pki.ca_fingerprint}")
    print(f"  CA private key   {pki.ca_key}   (keep offline; not needed by the server or the sites)")
    print(f"  server folder    {pki.server_cert.parent}/   (server.crt for {', '.join(pki.server_names)}, server.key, ca.crt, "
          f"tokens.json): all the server needs, `splitfl serve --pki {pki.server_cert.parent}`")
    for site, sp in pki.sites.items():
        print(f"  site {site:<12} {sp.cert.parent}/   (client.crt, client.key, ca.crt, token): `splitfl join --pki {sp.cert.parent}`")
    print(f"  manifest         {pki.manifest}")
    print(
        "WARNING: this is a DEVELOPMENT certificate authority. Real deployments must use certificates from the "
        "hospitals' own PKI. Copy each sites/<site>/ folder only to its hospital and server/ only to the server "
        "(a server refuses a folder holding the CA key, a consortium secret or a site's key or token). Under HE "
        "(or split-plain with a trainable encoder) run `splitfl keys` next: it adds each party's keys to its folder.",
        file=sys.stderr,
    )
    return pki
