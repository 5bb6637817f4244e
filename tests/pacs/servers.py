"""The real servers of the PACS tests: Debian's Orthanc (with DICOMweb) and the PACS worker process, both on
127.0.0.1 with ephemeral ports, both stopped by their owners' finalizers; plus a pynetdicom C-STORE sender and
the checks every PACS test makes on what came back."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
from pynetdicom import AE

from service.pacs.queue import JobQueue
from service.pacs.sr import read_sr
from service.pacs.writeback import metadata_values
from tests.deploy.tools import free_port, missing, require_executable
from tests.pacs.phantoms import PHI_MARKS, Instance

REPO = Path(__file__).resolve().parents[2]
ORTHANC_CONFIG = REPO / "deploy" / "orthanc" / "orthanc.json"
ROUTING_LUA = REPO / "deploy" / "orthanc" / "fusc-routing.lua"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
READY_TIMEOUT_S = 90.0


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------------ Orthanc
@dataclass
class Orthanc:
    """A real Orthanc from deploy/orthanc/orthanc.json, ports and storage changed; restartable on the same
    ports and storage (for the outage tests)."""

    workdir: Path
    receiver_port: int
    routing: bool = False
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log(self) -> Path:
        return self.workdir / "orthanc.log"

    def write_config(self) -> Path:
        config = json.loads(ORTHANC_CONFIG.read_text())
        for plugin in config["Plugins"]:
            if not Path(plugin).exists():
                missing(f"the Orthanc plugin {plugin}", "apt-get install -y orthanc-dicomweb")
        storage = self.workdir / "storage"
        config.update(
            StorageDirectory=str(storage),
            IndexDirectory=str(storage),
            HttpPort=self.http_port,
            DicomPort=self.dicom_port,
        )
        config["DicomModalities"]["fusc-integration"]["Port"] = self.receiver_port
        config_dir = self.workdir / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "orthanc.json").write_text(json.dumps(config, indent=1))
        if self.routing:
            lua = config_dir / "fusc-routing.lua"
            shutil.copy(ROUTING_LUA, lua)
            routing = json.loads((REPO / "deploy" / "orthanc" / "fusc-routing.json").read_text())
            routing["LuaScripts"] = [str(lua)]
            (config_dir / "fusc-routing.json").write_text(json.dumps(routing))
        return config_dir

    def start(self) -> Orthanc:
        binary = require_executable("Orthanc", "orthanc orthanc-dicomweb")
        config_dir = self.write_config()
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([binary, str(config_dir)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"Orthanc did not start:\n{_tail(self.log)}")
            time.sleep(0.1)

    def stop(self, *, crash: bool = False) -> None:
        """SIGTERM (Orthanc finishes what it serves, which takes seconds); ``crash``: SIGKILL, an outage
        that starts at once."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        if crash:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    # --- REST helpers
    def upload(self, data: bytes) -> str:
        response = httpx.post(f"{self.url}/instances", content=data, timeout=30)
        response.raise_for_status()
        return str(response.json()["ID"])

    def lookup(self, sop_instance_uid: str) -> str | None:
        found = httpx.post(f"{self.url}/tools/lookup", content=sop_instance_uid, timeout=10).json()
        ids = [f["ID"] for f in found if f["Type"] == "Instance"]
        return ids[0] if ids else None

    def metadata(self, orthanc_id: str) -> dict[str, str]:
        return httpx.get(f"{self.url}/instances/{orthanc_id}/metadata?expand", timeout=10).json()

    def instances_of_class(self, sop_class_uid: str) -> list[str]:
        ids = httpx.get(f"{self.url}/instances", timeout=30).json()
        return [
            i
            for i in ids
            if httpx.get(f"{self.url}/instances/{i}/metadata/SopClassUid", timeout=10).text == sop_class_uid
        ]

    def file(self, orthanc_id: str) -> bytes:
        return httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30).content


# ------------------------------------------------------------------------------------------ PACS worker
@dataclass
class WorkerProcess:
    """``python -m service.pacs run`` as a subprocess in its own session; SIGKILL-able and restartable."""

    workdir: Path
    repository: Path
    env: dict[str, str]
    receiver_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def data_dir(self) -> Path:
        return self.workdir / "pacs-data"

    @property
    def log(self) -> Path:
        return self.workdir / "worker.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSC_", "PROMETHEUS_MULTIPROC_DIR"))}
        env.update(
            {
                "PYTHONPATH": str(REPO),
                "FUSC_MODEL_REPOSITORY": str(self.repository),
                "FUSC_LOG_LEVEL": "DEBUG",
                "FUSC_PACS_DATA_DIR": str(self.data_dir),
                "FUSC_PACS_HOST": "127.0.0.1",
                "FUSC_PACS_PORT": str(self.receiver_port),
                "FUSC_PACS_HTTP_HOST": "127.0.0.1",
                "FUSC_PACS_HTTP_PORT": str(self.http_port),
                "FUSC_PACS_BACKOFF_BASE_S": "0.25",
                "FUSC_PACS_BACKOFF_MAX_S": "2",
                "FUSC_PACS_MAX_ATTEMPTS": "60",
                "FUSC_PACS_POLL_INTERVAL_S": "0.5",
                "FUSC_PACS_HTTP_TIMEOUT_S": "5",
                **self.env,
            }
        )
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n=== start {self.starts} ===\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.pacs", "run"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the PACS worker exited with {self.process.returncode}:\n{_tail(self.log)}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the PACS worker was not ready in {READY_TIMEOUT_S:.0f} s:\n{_tail(self.log)}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no handler runs, no transaction finishes, the lock file is released by the kernel."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def outputs(self) -> list[str]:
        """Everything the worker writes that a person or a scraper reads: its log, its metrics and the error
        codes of its jobs (the texts a patient identifier must never appear in)."""
        queue = self.queue()
        try:
            codes = " ".join(str(j["error_code"]) for j in queue.jobs())
        finally:
            queue.close()
        return [self.log.read_text(errors="replace"), self.metrics(), codes]

    def queue(self) -> JobQueue:
        return JobQueue(self.data_dir / "queue.sqlite3", self.data_dir / "spool").open(exclusive=False)

    def wait_settled(self, expected: int, timeout_s: float) -> dict[str, int]:
        """Until ``expected`` jobs exist and none is queued or running; returns the counts by state."""
        queue = self.queue()
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                counts = queue.stats().counts
                total = sum(counts.values())
                if total >= expected and counts["queued"] == counts["running"] == 0:
                    return counts
                if time.monotonic() > deadline:
                    pytest.fail(f"the queue did not settle in {timeout_s:.0f} s: {counts}\n{_tail(self.log)}")
                time.sleep(0.25)
        finally:
            queue.close()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            continue
        total += float(value)
    return total


# ------------------------------------------------------------------------------------------- C-STORE
def cstore(
    instances: Iterable[Instance], port: int, *, called: str = "FUSC", calling: str = "US_SCANNER"
) -> dict[str, int | None]:
    """Send each instance by C-STORE (one association, renewed if it drops); the status per SOP Instance
    UID, None where the association failed (the worker was down)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    instances = list(instances)
    for sop_class, syntax in {(i.sop_class_uid, i.dataset.file_meta.TransferSyntaxUID) for i in instances}:
        ae.add_requested_context(sop_class, [syntax])
    out: dict[str, int | None] = {}
    assoc = None
    for inst in instances:
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            out[inst.sop_instance_uid] = None
            assoc = None
            continue
        status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(inst.data)))
        out[inst.sop_instance_uid] = int(status.Status) if "Status" in status else None
    if assoc is not None and assoc.is_established:
        assoc.release()
    return out


# ------------------------------------------------------------------------------------------- checks
def check_results(
    orthanc: Orthanc, worker: WorkerProcess, instances: list[Instance], forms: set[str]
) -> dict:
    """Every image instance: exactly one job, done, one result; each write-back form read back from Orthanc
    and equal to it. Dead kinds: dead with their code. Non-image classes: never queued."""
    queue = worker.queue()
    try:
        jobs = {j["sop_instance_uid"]: j for j in queue.jobs()}
    finally:
        queue.close()
    images = [i for i in instances if i.is_image]
    srs: dict[str, list[dict[str, Any]]] = {}
    if "sr" in forms:
        for orthanc_id in orthanc.instances_of_class(COMPREHENSIVE_SR):
            data = orthanc.file(orthanc_id)
            document = hd.sr.srread(io.BytesIO(data))  # highdicom parses it as a Comprehensive SR
            assert isinstance(document, hd.sr.ComprehensiveSR)
            fields = read_sr(pydicom.dcmread(io.BytesIO(data)))
            evidence = {
                sop.ReferencedSOPInstanceUID
                for study in document.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for sop in series.ReferencedSOPSequence
            }
            assert evidence == fields["references"], (
                "the evidence and the content reference different instances"
            )
            (source,) = fields["references"]
            srs.setdefault(source, []).append(fields)
    for inst in instances:
        job = jobs.get(inst.sop_instance_uid)
        if inst.kind == "pdf":
            assert job is None, "a non-image SOP class was queued"
            continue
        assert job is not None, f"{inst.kind} instance never queued"
        if inst.dead_code:
            assert (job["state"], job["error_code"]) == ("dead", inst.dead_code), (inst.kind, job)
            assert inst.sop_instance_uid not in srs
            continue
        assert job["state"] == "done", (inst.kind, job["state"], job["error_code"])
        result = job["result"]
        assert result is not None and result["model_version"]
        if inst.kind in ("us_mf", "us_mf_jpeg"):
            assert result["n_frames"] > 1
        if "sr" in forms:
            (sr,) = srs.get(inst.sop_instance_uid, [None])  # exactly one SR per instance
            assert sr is not None, f"no SR for a {inst.kind} instance"
            assert sr["cluster"] == result["cluster"] and sr["view"] == result["view"]
            assert sr["confidence"] == pytest.approx(result["confidence"], abs=1e-6)
            assert sr["model_version"] == result["model_version"]
        if "metadata" in forms:
            orthanc_id = orthanc.lookup(inst.sop_instance_uid)
            assert orthanc_id is not None
            metadata = orthanc.metadata(orthanc_id)
            expected = metadata_values(result)
            assert {k: metadata.get(k) for k in expected} == expected
    if "sr" in forms:
        assert len(srs) == len([i for i in images]), "an SR refers to an instance that is not a phantom image"
    return jobs


def assert_no_phi(*texts: str) -> None:
    for text in texts:
        for mark in PHI_MARKS:
            assert mark not in text, f"the phantom identity ({mark}) appears in a log, metric or error"
