"""A real Orthanc for tests: Debian's ``Orthanc`` on free loopback ports, optionally with its DICOMweb plugin.

    orthanc = Orthanc(processes_start, tmp_path / "pacs", "PACS", router_port=port, dicomweb=True)
    orthanc.dicomweb_url   # http://127.0.0.1:<port>/dicom-web

Used by the router's Orthanc tests (tests/routing/test_orthanc.py) and the DICOMweb tests (destinations,
STOW-RS intake, the back-fill's DICOMweb source). ``orthanc_binary()`` / ``dicomweb_plugin()`` are None where
the packages are missing (``apt-get install orthanc orthanc-dicomweb``): tests skip then.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path

import pydicom

from tests.routing.conftest import free_port, listening, wait_for
from utils.routing.intake.orthanc_source import OrthancClient

USER, PASSWORD = "router", "s3cret"
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()),
                                           None)


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's library (Debian's ``orthanc-dicomweb``), or None."""
    return next((p for p in DICOMWEB_PLUGINS if Path(p).is_file()), None)


class Orthanc:
    """One Orthanc process with its own configuration, storage and index folders on free loopback ports."""

    def __init__(self, start, folder: Path, aet: str, *, router_port: int | None = None, auth: bool = False,
                 check_called_aet: bool = True, dicomweb: bool = False) -> None:
        self.aet, self.http_port, self.dicom_port = aet, free_port(), free_port()
        folder.mkdir(parents=True)
        config = {"Name": aet, "DicomAet": aet, "StorageDirectory": str(folder / "storage"),
                  "IndexDirectory": str(folder / "index"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": auth,
                  "RegisteredUsers": {USER: PASSWORD} if auth else {}, "Plugins": [], "SaveJobs": False,
                  "StorageCompression": False, "HttpCompressionEnabled": False, "ConcurrentJobs": 2,
                  "DicomCheckCalledAet": check_called_aet,  # the downstreams accept every called AE title, recorded
                  "DicomModalities": {"router": ["ROUTER", "127.0.0.1", router_port]} if router_port else {}}
        if dicomweb:
            plugin = dicomweb_plugin()
            assert plugin, "the DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
            config["Plugins"] = [plugin]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                                  "Host": f"127.0.0.1:{self.http_port}", "Ssl": False}
        (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.process = start([orthanc_binary(), folder / "orthanc.json"], folder / "orthanc.log")
        self.client = OrthancClient(f"http://127.0.0.1:{self.http_port}", *((USER, PASSWORD) if auth else ()),
                                    timeout_s=30)
        wait_for(lambda: self._ready() or not self.process.alive(), 60, f"Orthanc {aet} to answer /system")
        assert self.process.alive(), self.process.output()
        assert listening(self.dicom_port), self.process.output()

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def _ready(self) -> bool:
        try:
            return self.client.get_json("/system")["DicomAet"] == self.aet
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.client.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={k: v for k, v in self.client._headers.items()
                                                  if k == "Authorization"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def upload(self, path: Path) -> str:
        """Store one file through Orthanc's REST API (POST /instances); its Orthanc id."""
        request = urllib.request.Request(self.client.url + "/instances", data=Path(path).read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom",
                                                  **{k: v for k, v in self.client._headers.items()
                                                     if k == "Authorization"}})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read())["ID"]

    def instances(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc instance id."""
        return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in self.client.get_json("/instances?expand")}

    def instance_count(self) -> int:
        return len(self.client.get_json("/instances"))

    def called_aet(self, instance: str) -> str:
        return self.client.get(f"/instances/{instance}/metadata/CalledAET").decode().strip()

    def raw_file(self, instance: str) -> bytes:
        return self.client.get(f"/instances/{instance}/file")

    def file(self, instance: str) -> pydicom.Dataset:
        return pydicom.dcmread(BytesIO(self.raw_file(instance)))
