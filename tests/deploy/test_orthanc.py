"""deploy/orthanc: the example PACS configuration starts a real Orthanc with DICOMweb and its modalities.

Only ports and storage are changed for the test (ephemeral ports, a temporary directory).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.tools import free_port, missing, require_executable, stop

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "orthanc" / "orthanc.json"
READY_TIMEOUT_S = 15.0


def test_example_config_keeps_the_pacs_closed() -> None:
    config = json.loads(CONFIG.read_text())
    # HTTP answers 127.0.0.1 only (Orthanc has no bind-address option: it refuses remote clients instead).
    assert config["RemoteAccessAllowed"] is False
    assert config["DicomAlwaysAllowStore"] is False and config["DicomCheckModalityHost"] is True
    assert config["DeidentifyLogs"] is True
    assert config["DicomWeb"]["Enable"] is True
    assert any(p.endswith("libOrthancDicomWeb.so") for p in config["Plugins"])
    for name, modality in config["DicomModalities"].items():
        assert len(modality["AET"]) <= 16, name


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.integration
def test_orthanc_starts_with_the_example_config(tmp_path: Path) -> None:
    binary = require_executable("Orthanc", "orthanc orthanc-dicomweb")
    config = json.loads(CONFIG.read_text())
    for plugin in config["Plugins"]:
        if not Path(plugin).exists():
            missing(f"the Orthanc plugin {plugin}", "apt-get install -y orthanc-dicomweb")
    http_port, dicom_port = free_port(), free_port()
    storage = tmp_path / "storage"
    config.update(
        StorageDirectory=str(storage), IndexDirectory=str(storage), HttpPort=http_port, DicomPort=dicom_port
    )
    config_file = tmp_path / "orthanc.json"
    config_file.write_text(json.dumps(config))
    log = tmp_path / "orthanc.log"
    base = f"http://127.0.0.1:{http_port}"
    with log.open("w") as out:
        process = subprocess.Popen([binary, str(config_file)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                system = get_json(f"{base}/system")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
        assert system["DicomAet"] == config["DicomAet"] and system["DicomPort"] == dicom_port
        assert set(get_json(f"{base}/modalities")) == set(config["DicomModalities"])
        assert "dicom-web" in get_json(f"{base}/plugins")
        assert get_json(f"{base}/dicom-web/studies") == []
    finally:
        stop(process, timeout=15)
