"""DICOM over TLS: the router's own port (``tls:``) and each destination (``destinations.<route>.tls``).

    tls:                                # the router's port speaks TLS only (plain TCP is refused)
      cert: tls/router.crt              # PEM certificate (chain) the router presents
      key: tls/router.key               # its private key (PEM, unencrypted)
      ca: tls/senders-ca.pem            # CA(s) that sign the senders' certificates
      require_client_cert: true         # default (ROUTER_TLS_REQUIRE_CLIENT_CERT); false: any sender, encrypted
    destinations:
      adult_chest:
        {ae_title: CHEST_AI, host: ai.example.org, port: 2762,
         tls: {ca: tls/ai-ca.pem, cert: tls/router-client.crt, key: tls/router-client.key, check_hostname: true}}

Everything is checked when the configuration is loaded (router start and ``--check``), by building
the SSL contexts: a missing or unreadable file, a key that is not a PEM key, a key that does not
belong to its certificate and a CA file without a certificate are each refused with the key's name
and the file. TLS 1.2 is the oldest version offered; Python's defaults choose the ciphers.

The router's server context hands the TLS handshake to the association's own thread
(:class:`_HandshakeInThread`): pynetdicom wraps an accepted socket in its accept loop, and with
Python's default the handshake would run there, so one connection that never sends a ClientHello
would stop the router from accepting anything. A client that fails the handshake (speaks plain
DICOM, has no certificate, or one from another CA) only loses its own connection.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import constants
from utils.config import ConfigError
from utils.routing.operations.schema import resolve_path

PREFIX = "ROUTER_TLS_"  # the constants of the tls blocks' switches (the key is the name without the prefix)
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class ServerTLS:
    """TLS on the router's own port."""

    cert: Path
    key: Path
    ca: Path | None = None  # verifies the senders' certificates
    require_client_cert: bool = constants.ROUTER_TLS_REQUIRE_CLIENT_CERT

    def to_dict(self) -> dict[str, Any]:
        return {"cert": str(self.cert), "key": str(self.key), "ca": str(self.ca) if self.ca else None,
                "require_client_cert": self.require_client_cert}

    def describe(self) -> str:
        clients = (f"client certificates required, signed by {self.ca}" if self.require_client_cert else
                   f"client certificates verified against {self.ca} when sent" if self.ca else
                   "no client certificates asked for")
        return f"TLS (certificate {self.cert}; {clients})"


@dataclass(frozen=True)
class ClientTLS:
    """TLS towards one destination."""

    ca: Path | None = None  # verifies the destination's certificate (None: the system's CAs)
    cert: Path | None = None  # the router's client certificate, when the destination asks for one
    key: Path | None = None
    check_hostname: bool = constants.ROUTER_TLS_CHECK_HOSTNAME
    server_hostname: str = ""  # the name its certificate must carry ("": the destination's host)

    def to_dict(self) -> dict[str, Any]:
        return {"ca": str(self.ca) if self.ca else None, "cert": str(self.cert) if self.cert else None,
                "key": str(self.key) if self.key else None, "check_hostname": self.check_hostname,
                "server_hostname": self.server_hostname or None}

    def describe(self, host: str) -> str:
        name = self.server_hostname or host
        return (f"TLS (CA {self.ca or 'system'}; client certificate {'yes' if self.cert else 'no'}; hostname check "
                f"{'on: ' + name if self.check_hostname else 'off'})")

    def tls_args(self, host: str) -> tuple[ssl.SSLContext, str]:
        """What pynetdicom's ``AE.associate(tls_args=...)`` takes."""
        return client_context(self), self.server_hostname or host


# --- parsing (utils/routing/operations/config.py) -------------------------------------------------------


def server_from(block, base: Path, where: str) -> ServerTLS:
    """The validated ``tls`` block (utils/routing/operations/schema.py) -> settings; every file read and checked now,
    not at the first connection. ConfigError naming the key."""
    where = f"{where}: tls"
    spec = block.model_dump(exclude_none=True)
    settings = ServerTLS(cert=_file(spec, "cert", base, where), key=_file(spec, "key", base, where),
                         ca=_file(spec, "ca", base, where) if "ca" in spec else None,
                         require_client_cert=block.require_client_cert)
    if settings.require_client_cert and settings.ca is None:
        raise ConfigError(f"{where}: require_client_cert needs ca (the CA that signs the senders' certificates); "
                          f"or set require_client_cert: false")
    server_context(settings, where)
    return settings


def client_from(block, base: Path, where: str) -> ClientTLS:
    """A destination's validated ``tls`` block -> settings, its files checked now."""
    where = f"{where}.tls"
    spec = block.model_dump(exclude_none=True)
    if ("cert" in spec) != ("key" in spec):
        raise ConfigError(f"{where}: a client certificate needs both cert and key")
    settings = ClientTLS(ca=_file(spec, "ca", base, where) if "ca" in spec else None,
                         cert=_file(spec, "cert", base, where) if "cert" in spec else None,
                         key=_file(spec, "key", base, where) if "key" in spec else None,
                         check_hostname=block.check_hostname, server_hostname=block.server_hostname.strip())
    client_context(settings, where)
    return settings


def _file(spec: dict, key: str, base: Path, where: str) -> Path:
    path = resolve_path(spec[key].strip(), base)
    if not path.is_file():
        raise ConfigError(f"{where}.{key}: {path}: no such file")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise ConfigError(f"{where}.{key}: {path}: cannot be read ({error.strerror})") from error
    return path


# --- contexts ------------------------------------------------------------------------------


class _HandshakeInThread(ssl.SSLContext):
    """A server context whose sockets do their handshake on first use, in the association's thread (see the
    module docstring), not in pynetdicom's accept loop."""

    def wrap_socket(self, sock, *args, **kwargs):
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(settings: ServerTLS, where: str = "tls") -> ssl.SSLContext:
    """The SSL context of the router's port; ConfigError naming the file for what cannot be loaded."""
    context = _HandshakeInThread(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, settings.cert, settings.key, where)
    if settings.ca is not None:
        _load_ca(context, settings.ca, f"{where}.ca")
        context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(settings: ClientTLS, where: str = "tls") -> ssl.SSLContext:
    """The SSL context towards one destination; ConfigError naming the file for what cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, hostname checked
    context.minimum_version = MINIMUM_VERSION
    context.check_hostname = settings.check_hostname
    if settings.ca is not None:
        _load_ca(context, settings.ca, f"{where}.ca")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.cert is not None and settings.key is not None:
        _load_chain(context, settings.cert, settings.key, where)
    return context


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path, where: str) -> None:
    try:
        context.load_cert_chain(cert, key, password=_refuse_password(key, where))
    except ssl.SSLError as error:
        text = str(error)
        if "KEY_VALUES_MISMATCH" in text or "key values mismatch" in text:
            raise ConfigError(f"{where}: the key {key} does not belong to the certificate {cert}") from error
        raise ConfigError(f"{where}: cannot load the certificate {cert} with the key {key}: "
                          f"{_reason(error)} (PEM files expected; an encrypted key is not supported)") from error
    except OSError as error:
        raise ConfigError(f"{where}: cannot read {cert} or {key}: {error}") from error


def _refuse_password(key: Path, where: str):
    def ask() -> str:  # OpenSSL asks only for an encrypted key; without this it would prompt on the terminal
        raise ConfigError(f"{where}: the key {key} is encrypted; give an unencrypted PEM key (readable by the "
                          f"router's user only)")
    return ask


def _load_ca(context: ssl.SSLContext, ca: Path, where: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f"{where}: {ca}: not a PEM file of CA certificates ({_reason(error)})") from error


def _reason(error: Exception) -> str:
    return getattr(error, "reason", None) or str(error)
