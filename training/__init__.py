"""fusc offline training: SSL backbone, kNN mining, FUSC cluster head, export to a Triton model repository.

Importing this package does not import torch; the modules that need it do.
"""
