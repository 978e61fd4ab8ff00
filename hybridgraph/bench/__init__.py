"""Benchmarks: `hybridgraph bench <suite>` (see run.py for the suites and report.py for
what each result file records)."""
