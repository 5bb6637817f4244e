"""Archive runs: cluster a whole archive through the service's pipeline (no torch), resumably.

``store`` is the run folder's format, read by the review app (service/review) as well.
"""
