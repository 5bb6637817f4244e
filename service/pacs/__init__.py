"""PACS integration: DICOM in (C-STORE receiver, DICOMweb watcher), one durable queue, results back (Orthanc
metadata, a Comprehensive SR). The runtime's own data path (service.pipeline) does the work; no torch here.

Modules: settings (FUSC_PACS_*), queue (SQLite jobs, retries, dead letters), receiver, watcher, frames
(frame policy), worker (one attempt at a job), writeback and sr (the two result forms), metrics, app (the
process), __main__ (the command). docs/pacs.md is the operator's page.
"""
