"""Evaluation: metrics, baselines, reports and galleries, embedding health, scoring through the service."""
