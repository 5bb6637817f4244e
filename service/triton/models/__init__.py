"""Python-backend ``model.py`` files that ``service.triton.repository`` copies into a Triton repository.

They run inside ``tritonserver``'s Python stub (they import ``triton_python_backend_utils``), never in the
service process.
"""
