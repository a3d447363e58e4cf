"""Benchmarks behind ``gen bench …``. Speed is measured here, never in unit tests."""
