"""``python -m service.review RUN_DIR``: serve the review of one run on 127.0.0.1 (by default).

Anywhere but loopback it needs an access token (``--token-file`` or ``FUSC_REVIEW_TOKEN``) or basic-auth
users (``--users-file``, one ``user:password`` a line).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _users(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    users = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise SystemExit(f"{path}: each line must be user:password")
            users[user] = password
    return users


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.review", description=__doc__.splitlines()[0])
    ap.add_argument(
        "run_dir", type=Path, help="a finished archive run folder (run.json, results.parquet, ...)"
    )
    ap.add_argument(
        "--state", type=Path, default=None, help="decisions and picture cache (default RUN_DIR/review)"
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--token-file", type=Path, default=None, help="file holding the access token")
    ap.add_argument("--users-file", type=Path, default=None, help="basic-auth users, user:password a line")
    ap.add_argument(
        "--user", default=None, help="the reviewer's name when nobody signs in (default: login name)"
    )
    ap.add_argument("--model-repository", type=Path, default=None, help="where new card versions go")
    ap.add_argument("--labelstudio-url", default=os.environ.get("FUSC_LABELSTUDIO_URL"))
    ap.add_argument(
        "--labelstudio-root",
        type=Path,
        default=os.environ.get("FUSC_LABELSTUDIO_ROOT"),
        help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: cleaned frames for its tasks go here",
    )
    args = ap.parse_args(argv)

    import uvicorn

    from service.review.app import ReviewConfig, create_app

    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("FUSC_REVIEW_TOKEN")
    try:
        user = args.user or getpass.getuser()
    except (KeyError, OSError):
        user = "reviewer"
    config = ReviewConfig(
        run_dir=args.run_dir,
        state_dir=args.state,
        host=args.host,
        token=token or None,
        users=_users(args.users_file),
        default_user=user,
        model_repository=args.model_repository,
        labelstudio_url=args.labelstudio_url,
        labelstudio_token=os.environ.get("FUSC_LABELSTUDIO_TOKEN"),
        labelstudio_root=args.labelstudio_root.resolve() if args.labelstudio_root else None,
    )
    try:
        app = create_app(config)
    except (ValueError, OSError) as exc:
        print(f"fusc review: {exc}", file=sys.stderr)
        return 2
    print(f"fusc review of {args.run_dir} at http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
