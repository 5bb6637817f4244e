"""fusc runtime: decode -> clean -> embed -> assign, served by BentoML. No torch import anywhere here."""

__version__ = "0.1.0"
