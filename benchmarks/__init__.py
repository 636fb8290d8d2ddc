"""Benchmarks: vislib's methods against physical references and peer libraries.

Run with ``python -m benchmarks.run`` (see :mod:`benchmarks.run`).
"""
