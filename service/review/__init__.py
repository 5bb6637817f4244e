"""The review web app: people look at a run's clusters, name, merge, split and fix them, and hand the labels
on (labels table, a new model card version, Label Studio). ``python -m service.review RUN_DIR``.

No torch here: the app reads a finished run folder (service/archive/store.py) and uses the service's own
decode + clean for its pictures.
"""
