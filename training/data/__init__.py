"""Data: readers for the published layouts, the phantom generator, augmentations, OCR pseudo-labels."""
