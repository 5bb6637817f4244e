"""The scale-out engine: Ray Data over a running Ray cluster (``--engine ray --address HOST:PORT``).

Designed around what Ray's own issue tracker warns about:

* no ``read_images`` over the tree (listing a huge tree there is slow, and it would decode with PIL, not
  with the service's decoder): the dataset is the driver's plan, one row per chunk of paths, and each
  actor reads and decodes its chunk inside ``map_batches``, through the same ChunkWorker as the pool;
* Ray sets ``OMP_NUM_THREADS=1`` in its workers: ONNX Runtime's thread count is set explicitly on the
  session (``--ort-threads``), so the environment decides nothing;
* Ray Data does not keep order: every output row carries its chunk index, and the driver commits parts by
  index (the final results are sorted by key anyway);
* on one host Ray binds to the machine's network address unless told: a loopback ``--address`` (or
  ``--node-ip-address``) makes the driver join on that address too, so all traffic stays on loopback.

Every node needs fusc installed (the same version), the model repository at the same path, and the images
(a shared file system, or a DICOMweb source every node can reach). Chunks come back to the driver as Arrow
IPC bytes; the driver writes the run folder, so workers need no write access to it.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from service.archive.errors import EngineUnavailableError
from service.archive.ledger import Chunk
from service.archive.worker import ChunkWorker, WorkerConfig, limit_threads


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class RayChunkActor:
    """One per Ray actor: loads the pipeline once, then answers one chunk per call."""

    def __init__(self, cfg: WorkerConfig) -> None:
        import ray

        limit_threads(cfg.ort_threads)
        self.worker = ChunkWorker(cfg)
        self.node = ray.util.get_node_ip_address()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks, tables = [], []
        for index, rows in zip(batch["chunk"], batch["rows"], strict=True):
            chunks.append(int(index))
            tables.append(_to_ipc(self.worker.run(json.loads(rows))))
        return {
            "chunk": np.asarray(chunks, np.int64),
            "table": np.asarray(tables, dtype=object),
            "node": np.asarray([self.node] * len(chunks), dtype=object),
        }


def _loopback_host(address: str | None) -> str | None:
    if not address or address == "auto":
        return None
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


def run_ray(
    cfg: WorkerConfig,
    chunks: Iterable[Chunk],
    *,
    workers: int = 0,
    address: str | None = None,
    node_ip: str | None = None,
    cpus_per_worker: float = 1.0,
    stats: dict | None = None,
) -> Iterator[tuple[int, pa.Table]]:
    """Chunks on the cluster's actors; ``stats`` (when given) gets the actors and the chunks per node."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise EngineUnavailableError("the Ray engine needs the ray extra: pip install -e '.[ray]'") from exc

    kwargs: dict = {"address": address or "auto", "log_to_driver": False, "configure_logging": False}
    node_ip = node_ip or _loopback_host(address)
    if node_ip:
        kwargs["_node_ip_address"] = node_ip
    if address and address != "auto":
        # ray.init waits minutes for a cluster that is not there; a plain connect answers at once.
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise EngineUnavailableError(
                f"no Ray cluster answers at {address} ({type(exc).__name__}); start one with "
                "ray start --head (docs/archive.md)"
            ) from exc
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EngineUnavailableError(
            f"no Ray cluster answered at {address or 'auto'} ({type(exc).__name__}: {exc}); start one with "
            "ray start --head (docs/archive.md), with the same RAY_AUTH_TOKEN"
        ) from exc
    try:
        items = [{"chunk": c.index, "rows": json.dumps(c.rows)} for c in chunks]
        if not items:
            return
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = max(1, min(workers or int(cpus / cpus_per_worker), len(items)))
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * actors))
        out = ds.map_batches(
            RayChunkActor,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=1,
            concurrency=actors,
            num_cpus=cpus_per_worker,
            batch_format="numpy",
        )
        per_node: dict[str, int] = {}
        if stats is not None:
            stats.update(ray_actors=actors, ray_cluster_cpus=cpus, chunks_per_node=per_node)
        for batch in out.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            for index, data, node in zip(batch["chunk"], batch["table"], batch["node"], strict=True):
                per_node[str(node)] = per_node.get(str(node), 0) + 1
                yield int(index), _from_ipc(data)
    finally:
        ray.shutdown()
