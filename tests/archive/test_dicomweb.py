"""A DICOMweb source: a real Orthanc with its DICOMweb plugin on 127.0.0.1 holds the test DICOM files; the
archive lists them with QIDO-RS, fetches them with WADO-RS and answers as it does for the same files on
disk. Needs Debian's orthanc and orthanc-dicomweb."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.archive import store
from service.archive.run import RunOptions, run_archive
from service.archive.sources import resolve
from tests.archive.conftest import PATIENT_IDS
from tests.deploy.tools import free_port, missing, require_executable, stop

pytestmark = pytest.mark.integration
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require_executable("Orthanc", "orthanc orthanc-dicomweb")
    if not PLUGIN.exists():
        missing("the Orthanc DICOMweb plugin", "apt-get install -y orthanc-dicomweb")
    work = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {
        "Name": "fusc-archive-test",
        "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    with open(work / "orthanc.log", "w") as log:
        proc = subprocess.Popen([binary, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"{base}/system", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not start:\n{(work / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield base
    finally:
        stop(proc, timeout=15)


def test_a_dicomweb_source_answers_as_the_same_files_on_disk(
    orthanc: str, archive: Path, tiny_repo: Path, tmp_path: Path
) -> None:
    files = sorted((archive / "dicom").rglob("IM*"))
    for path in files:
        request = urllib.request.Request(f"{orthanc}/instances", data=path.read_bytes(), method="POST")
        urllib.request.urlopen(request, timeout=10).read()
    key_file = tmp_path / "secret"
    key_file.write_text("the same secret for both runs")
    common = dict(model_repository=tiny_repo, workers=1, progress=False, map_method="pca", report=False)
    url = f"{orthanc}/dicom-web"
    spec = resolve(url, qido="ModalitiesInStudy=US")
    assert spec.kind == "dicomweb" and spec.qido == (("ModalitiesInStudy", "US"),)
    run_archive(spec, RunOptions(out=tmp_path / "web", subject_key_file=key_file, **common))
    run_archive(
        str(archive / "dicom"), RunOptions(out=tmp_path / "disk", subject_key_file=key_file, **common)
    )
    web, disk = store.load_run(tmp_path / "web"), store.load_run(tmp_path / "disk")
    assert web.manifest.extra["source_kind"] == "dicomweb" and web.manifest.source.startswith(url)
    web_rows = {r["sop_instance_uid"]: r for r in web.table.to_pylist()}
    disk_rows = {r["sop_instance_uid"]: r for r in disk.table.to_pylist()}
    assert set(web_rows) == set(disk_rows) and len(web_rows) == len(files)
    for sop, row in web_rows.items():
        assert row["key"] == f"sop:{sop}" and row["error_code"] is None
        assert row["source"].startswith(f"{url}/studies/") and row["source"].endswith(f"/instances/{sop}")
        assert row["cluster"] == disk_rows[sop]["cluster"]
        assert row["confidence"] == pytest.approx(disk_rows[sop]["confidence"], abs=1e-6)
        # The subject key from QIDO's PatientID equals the one from the file's own header.
        assert row["subject_key"] == disk_rows[sop]["subject_key"] is not None
    assert len({r["subject_key"] for r in web_rows.values()}) == len(PATIENT_IDS)
    for path in (tmp_path / "web").rglob("*"):
        if path.is_file():
            assert not any(p.encode() in path.read_bytes() for p in PATIENT_IDS), path.name
