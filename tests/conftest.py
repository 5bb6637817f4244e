"""Session-wide test set-up that must happen before any test module imports prometheus_client."""

import os
import tempfile

# BentoML's /metrics reads prometheus_client's multiprocess files, as in a real server; the directory must be
# set before prometheus_client is first imported anywhere in the session (tests/deploy imports it too).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="fusc-prometheus-"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
