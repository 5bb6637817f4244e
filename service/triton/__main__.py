"""python -m service.triton repo|serve: write a Triton model repository; run the CPU tritonserver on one.

python -m service.triton repo --from model_repository --out build/triton-ngc --variant ngc
python -m service.triton repo --from model_repository --out build/triton-cpu --variant cpu
python -m service.triton serve --repository build/triton-cpu     # needs `make triton-venv`
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from service.errors import FuscError
from service.settings import Settings
from service.triton.repository import (
    VARIANTS,
    RepositoryExistsError,
    TritonRepositoryOptions,
    write_triton_repository,
)
from service.triton.server import TritonServerError, default_venv, start_cpu_server


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.triton", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    repo = sub.add_parser("repo", help="write a Triton model repository from a fusc model repository")
    repo.add_argument("--from", dest="source", type=Path, required=True, help="fusc model repository")
    repo.add_argument("--out", type=Path, required=True, help="folder to write (empty or absent)")
    repo.add_argument("--variant", choices=VARIANTS, required=True, help="ngc: NGC image; cpu: PyPI server")
    repo.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="max_batch_size of every model (default: FUSC_TRITON_MAX_BATCH_SIZE, 64)",
    )
    repo.add_argument("--preprocess-instances", type=int, default=1, help="instances of fusc_preprocess")
    repo.add_argument(
        "--python-env",
        default=None,
        help="EXECUTION_ENV_PATH of fusc_preprocess (a conda-pack tarball with OpenCV, pydicom, pydantic)",
    )
    repo.add_argument("--force", action="store_true", help="replace what an earlier run wrote in --out")

    serve = sub.add_parser("serve", help="run the CPU tritonserver of the Triton venv (foreground)")
    serve.add_argument("--repository", type=Path, required=True, help="a repository of the cpu variant")
    serve.add_argument("--venv", type=Path, default=None, help=f"Triton venv (default {default_venv()})")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "repo":
            batch = args.max_batch_size or Settings.from_env().triton_max_batch_size
            options = TritonRepositoryOptions(
                variant=args.variant,
                max_batch_size=batch,
                preprocess_instances=args.preprocess_instances,
                python_env=args.python_env,
            )
            models = write_triton_repository(args.source, args.out, options, force=args.force)
            print(f"wrote {args.variant} Triton repository {args.out}: {', '.join(models)}")
            return 0
        workdir = Path(tempfile.mkdtemp(prefix="fusc-tritonserver-"))
        server = start_cpu_server(
            args.repository,
            venv=args.venv,
            workdir=workdir,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
        )
        where = f"HTTP {server.http_url}, gRPC {server.grpc_url}, metrics :{server.metrics_port}"
        print(f"tritonserver ready: {where}; log {server.log}", flush=True)
        # The main frame keeps waiting for the process: the handler only passes the signal on.
        signal.signal(signal.SIGTERM, lambda *_: server.terminate())
        try:
            return server.process.wait()
        except KeyboardInterrupt:
            server.stop()
            return 0
    except (FuscError, RepositoryExistsError, TritonServerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
