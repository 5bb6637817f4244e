"""Triton Inference Server: the repository generator (``repository``), the CPU server from PyPI for
development and tests (``server``), and the Python-backend model files (``models/``).

The service's client side is ``service.backends.TritonBackend``; ``python -m service.triton`` is the CLI.
"""
