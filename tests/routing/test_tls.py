"""DICOM over TLS: into the router and on to a destination, with a throw-away CA made here.

The certificates come from the ``cryptography`` package (a requirement of pynetdicom's TLS tests
too; skipped where it is missing): one CA that signs the router, the destination and the senders
that may send, and a second CA whose certificate the router must refuse.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from tests.routing.conftest import (
    ROWS_BY_CLASS,
    bright_rows_image,
    free_port,
    needs_dcmtk,
    storescu_args,
    wait_for,
    write_config,
)
from utils.config import ConfigError
from utils.io.dicom_writer import write_dicom
from utils.routing.operations.config import load_config
from utils.routing.delivery.dcmtk import environment as dcmtk_environment
from utils.routing.queue import FORWARDED
from utils.routing.intake.scp import TRANSFER_SYNTAXES

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TIMEOUT = 60


# --- a throw-away PKI -------------------------------------------------------------------------


def _name(common_name: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path: Path, password: bytes | None = None) -> Path:
    encryption = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return path


def _write_cert(cert, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class CA:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = _write_cert(self.cert, folder / f"{name}.pem")

    def issue(self, common_name: str) -> tuple[Path, Path]:
        """(certificate, key) for ``localhost`` / 127.0.0.1, usable as server and as client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        stem = self.folder / f"{self.name}-{common_name}"
        return _write_cert(cert, stem.with_suffix(".crt")), _write_key(key, stem.with_suffix(".key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CA(folder, "test-ca"), CA(folder, "other-ca")
    return {"ca": ca.pem, "router": ca.issue("router"), "peer": ca.issue("peer"), "sender": ca.issue("sender"),
            "router_client": ca.issue("router-client"), "stranger": other.issue("stranger"), "folder": folder}


# --- peers --------------------------------------------------------------------------------------


class TLSPeer:
    """An in-process Storage SCP that accepts TLS only, from clients with a certificate of ``ca``."""

    def __init__(self, ae_title: str, cert: Path, key: Path, ca: Path) -> None:
        self.ae_title, self.port = ae_title, free_port()
        self.received: dict[str, bytes] = {}
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
        ae = AE(ae_title=ae_title)
        for c in AllStoragePresentationContexts:
            ae.add_supported_context(c.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=context,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        self.received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        return 0x0000

    def close(self) -> None:
        self.ae.shutdown()


@pytest.fixture
def tls_peer(pki):
    peer = TLSPeer("TLS_PEER", *pki["peer"], pki["ca"])
    yield peer
    peer.close()


def client_context(ca: Path, cert_key: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca)
    if cert_key:
        context.load_cert_chain(*cert_key)
    return context


def send_tls(port: int, paths: list[Path], tls: tuple[ssl.SSLContext, str] | None) -> list[int] | None:
    """C-STORE ``paths`` (over TLS unless ``tls`` is None); None when no association was established."""
    ae = AE(ae_title="SENDER")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    for path in paths:
        meta = pydicom.filereader.read_file_meta_info(path)
        ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER", tls_args=tls)
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def image(folder: Path, name: str, label: str = "adult_chest") -> Path:
    return write_dicom(folder / f"{name}.dcm", bright_rows_image(ROWS_BY_CLASS[label]), body_part="CHEST",
                       bits_stored=12)


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def tls_settings(pki, *, require: bool = True) -> dict:
    cert, key = pki["router"]
    return {"cert": str(cert), "key": str(key), "ca": str(pki["ca"]), "require_client_cert": require}


def destination_tls(pki) -> dict:
    cert, key = pki["router_client"]
    return {"ca": str(pki["ca"]), "cert": str(cert), "key": str(key), "server_hostname": "localhost"}


@pytest.fixture
def tls_router(router, pki, tls_peer):
    """A router with TLS on its port, every route forwarded over TLS to ``tls_peer``."""
    target = {"ae_title": tls_peer.ae_title, "host": "127.0.0.1", "port": tls_peer.port, "tls": destination_tls(pki)}
    routes = {c: target for c in (*ROWS_BY_CLASS, "uncertain")}
    return router(routes, tls=tls_settings(pki))


# --- end to end ---------------------------------------------------------------------------------


def test_a_store_over_tls_is_accepted_and_forwarded_over_tls(tls_router, tls_peer, pki, tmp_path):
    files = [image(tmp_path, f"img{i}", label) for i, label in enumerate(["adult_chest", "spine"])]
    assert send_tls(tls_router.port, files, (client_context(pki["ca"], pki["sender"]), "localhost")) == [0, 0]
    wanted = {uid(f) for f in files}
    wait_for(lambda: wanted <= set(tls_peer.received), TIMEOUT, "the objects to reach the TLS destination")
    for f in files:
        assert pydicom.dcmread(f).PixelData in tls_peer.received[uid(f)]  # forwarded as sent
    wait_for(lambda: len(tls_router.queue.items(FORWARDED)) == 2, TIMEOUT, "the deliveries to be recorded")


def test_senders_without_a_valid_certificate_are_refused_and_the_router_goes_on(tls_router, tls_peer, pki,
                                                                                  tmp_path):
    refused = image(tmp_path, "refused")
    no_cert = client_context(pki["ca"], None)
    other_ca = client_context(pki["ca"], pki["stranger"])  # trusts the router; its own certificate is foreign
    assert send_tls(tls_router.port, [refused], (no_cert, "localhost")) is None
    assert send_tls(tls_router.port, [refused], (other_ca, "localhost")) is None
    assert send_tls(tls_router.port, [refused], None) is None  # plain DICOM to the TLS port
    with socket.create_connection(("127.0.0.1", tls_router.port), timeout=5) as plain:  # raw bytes, not TLS
        plain.sendall(b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16)
        plain.settimeout(5)
        try:
            assert plain.recv(100) == b""  # closed, no DICOM answer
        except (ConnectionResetError, TimeoutError):
            pass
    assert tls_router.queue.items() == []  # nothing of theirs was stored
    silent = socket.create_connection(("127.0.0.1", tls_router.port), timeout=5)  # connected, never says a word
    try:
        good = image(tmp_path, "good")
        started = time.monotonic()
        assert send_tls(tls_router.port, [good], (client_context(pki["ca"], pki["sender"]), "localhost")) == [0]
        assert time.monotonic() - started < 30  # not held up behind the silent connection's handshake
        wait_for(lambda: uid(good) in tls_peer.received, TIMEOUT, "the good object to be forwarded")
    finally:
        silent.close()
    assert all(t.is_alive() for t in tls_router.forwarders) and tls_router.failure is None


def test_optional_client_certificates(router, pki, tls_peer, tmp_path):
    target = {"ae_title": tls_peer.ae_title, "host": "127.0.0.1", "port": tls_peer.port, "tls": destination_tls(pki)}
    node = router({c: target for c in (*ROWS_BY_CLASS, "uncertain")}, tls=tls_settings(pki, require=False))
    path = image(tmp_path, "anonymous")
    assert send_tls(node.port, [path], (client_context(pki["ca"], None), "localhost")) == [0]
    wait_for(lambda: uid(path) in tls_peer.received, TIMEOUT, "the object to be forwarded")
    # optional, but a certificate that is sent is still verified
    assert send_tls(node.port, [path], (client_context(pki["ca"], pki["stranger"]), "localhost")) is None


def test_a_destination_whose_certificate_does_not_verify_is_down(router, pki, tmp_path, tls_peer):
    """The router's CA for this destination is the other CA: the handshake fails, nothing is delivered, the
    object waits in the queue."""
    wrong = {**destination_tls(pki), "ca": str(pki["stranger"][0])}  # a certificate, not the CA that signed the peer
    target = {"ae_title": tls_peer.ae_title, "host": "127.0.0.1", "port": tls_peer.port, "tls": wrong}
    node = router({c: target for c in (*ROWS_BY_CLASS, "uncertain")})
    path = image(tmp_path, "waits")
    assert send_tls(node.port, [path], None) == [0]  # the router's own port is plain here
    wait_for(lambda: any(f.failures for f in node.forwarders), TIMEOUT, "the destination to be reported down")
    assert tls_peer.received == {}
    assert [i.state for i in node.queue.items()] == ["classified"]


@needs_dcmtk
def test_dcmtk_storescu_over_tls(tls_router, tls_peer, pki, tmp_path):
    """The documented storescu +tls command line works against the router."""
    import subprocess

    path = image(tmp_path, "dcmtk")
    cert, key = pki["sender"]
    args = storescu_args([path], tls_router.port, tmp_path)
    tool, rest = args[0], args[1:]
    command = [tool, "+tls", str(key), str(cert), "+cf", str(pki["ca"]), *rest]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                            env=dcmtk_environment())
    assert result.returncode == 0 and "Store Failed" not in result.stderr, result.stdout + result.stderr
    wait_for(lambda: uid(path) in tls_peer.received, TIMEOUT, "the object to be forwarded")


# --- the configuration is checked at load ----------------------------------------------------------


def _load(tmp_path: Path, model_file: Path, **extra):
    dest = {"ae_title": "DEST", "host": "127.0.0.1", "port": 104}
    dest.update(extra.pop("destination", {}))
    routes = {c: dest for c in (*ROWS_BY_CLASS, "uncertain")}
    return load_config(write_config(tmp_path / "router.yaml", port=11112, spool=tmp_path / "spool",
                                    model=model_file, destinations=routes, **extra))


def test_a_valid_tls_configuration_loads(tmp_path, model_file, pki):
    config = _load(tmp_path, model_file, tls=tls_settings(pki), destination={"tls": destination_tls(pki)})
    assert config.tls.require_client_cert and config.tls.ca == pki["ca"]
    assert all(d.tls.cert == pki["router_client"][0] for d in config.destinations.values() if not d.is_folder)
    assert config.to_dict()["tls"]["cert"] == str(pki["router"][0])
    yaml.safe_dump(config.to_dict())  # the resolved configuration can be written out


@pytest.mark.parametrize("case, message", [
    ("missing_cert", "no such file"),
    ("mismatch", "does not belong to the certificate"),
    ("garbage_key", "cannot load the certificate"),
    ("encrypted_key", "is encrypted"),
    ("no_ca_but_required", "require_client_cert needs ca"),
    ("bad_ca", "not a PEM file of CA certificates"),
    ("unknown_key", "unknown key 'verify'"),
    ("not_bool", r"tls.require_client_cert: expected bool, got str"),
])
def test_bad_server_tls_is_refused_with_a_clear_message(tmp_path, model_file, pki, case, message):
    settings = tls_settings(pki)
    folder = pki["folder"]
    if case == "missing_cert":
        settings["cert"] = str(folder / "nowhere.crt")
    elif case == "mismatch":
        settings["key"] = str(pki["peer"][1])
    elif case == "garbage_key":
        (tmp_path / "garbage.key").write_text("not a key\n")
        settings["key"] = str(tmp_path / "garbage.key")
    elif case == "encrypted_key":
        key = serialization.load_pem_private_key(pki["router"][1].read_bytes(), None)
        settings["key"] = str(_write_key(key, tmp_path / "encrypted.key", b"secret"))
    elif case == "no_ca_but_required":
        del settings["ca"]
    elif case == "bad_ca":
        (tmp_path / "empty.pem").write_text("")
        settings["ca"] = str(tmp_path / "empty.pem")
    elif case == "unknown_key":
        settings["verify"] = True
    elif case == "not_bool":
        settings["require_client_cert"] = "yes"
    with pytest.raises(ConfigError, match=message) as raised:
        _load(tmp_path, model_file, tls=settings)
    assert "tls" in str(raised.value)


def test_bad_destination_tls_is_refused(tmp_path, model_file, pki):
    with pytest.raises(ConfigError, match=r"destinations\.\w+\.tls: a client certificate needs both cert and key"):
        _load(tmp_path, model_file, destination={"tls": {"ca": str(pki["ca"]), "cert": str(pki["sender"][0])}})
    with pytest.raises(ConfigError, match=r"destinations\.\w+\.tls\.ca: .*no such file"):
        _load(tmp_path, model_file, destination={"tls": {"ca": str(tmp_path / "missing.pem")}})
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        _load(tmp_path, model_file, destination={"tls": {"cert": str(pki["sender"][0]), "key": str(pki["peer"][1])}})


def test_routes_to_one_node_must_agree_on_tls(tmp_path, model_file, pki):
    dest = {"ae_title": "DEST", "host": "127.0.0.1", "port": 104}
    routes = {c: dest for c in (*ROWS_BY_CLASS, "uncertain")}
    routes["spine"] = {**dest, "tls": destination_tls(pki)}
    with pytest.raises(ConfigError, match="same node .* different tls settings"):
        load_config(write_config(tmp_path / "router.yaml", port=11112, spool=tmp_path / "spool", model=model_file,
                                 destinations=routes))


def test_check_shows_tls_and_echoes_over_tls(tmp_path, model_file, pki, tls_peer, capsys):
    from utils.routing.operations.service import check

    target = {"ae_title": tls_peer.ae_title, "host": "127.0.0.1", "port": tls_peer.port, "tls": destination_tls(pki)}
    config = load_config(write_config(tmp_path / "router.yaml", port=11112, spool=tmp_path / "spool",
                                      model=model_file, destinations={c: target for c in (*ROWS_BY_CLASS, "uncertain")},
                                      tls=tls_settings(pki)))
    assert check(config) == 0
    out = capsys.readouterr().out
    assert "with TLS (certificate" in out and "client certificates required" in out
    assert f"TLS_PEER@127.0.0.1:{tls_peer.port} (TLS (CA {pki['ca']}; client certificate yes; hostname check on: " \
           f"localhost)): echo ok" in out
    wrong = {**target, "tls": {**destination_tls(pki), "cert": str(pki["stranger"][0]), "key": str(pki["stranger"][1])}}
    config = load_config(write_config(tmp_path / "router.yaml", port=11112, spool=tmp_path / "spool",
                                      model=model_file, destinations={c: wrong for c in (*ROWS_BY_CLASS, "uncertain")}))
    assert check(config) == 1  # the peer refuses the router's foreign certificate
    assert "TLS handshake failed" in capsys.readouterr().out


# --- the SCP's whole-PDU reads (utils.routing.intake.scp.read_whole), plain and over TLS ----------------


def test_read_whole_returns_exactly_what_was_asked_and_what_came_before_a_close():
    import threading
    from types import SimpleNamespace

    from utils.routing.intake.scp import read_whole

    a, b = socket.socketpair()
    try:
        payload = bytes(range(256)) * 8192  # 2 MB, more than one recv on any kernel
        sender = threading.Thread(target=lambda: (b.sendall(payload + b"next"), b.close()))
        sender.start()
        wrapped = SimpleNamespace(socket=a)
        assert read_whole(wrapped, len(payload)) == payload
        assert read_whole(wrapped, 4) == b"next"
        sender.join()
        assert read_whole(wrapped, 10) == b""  # closed: what came (nothing), as pynetdicom's recv returns
    finally:
        a.close()
