"""Fixtures for the reference-checkpoint tests; the builders live in reference_builders.py
(a module of its own name: `from conftest import` is ambiguous across test folders)."""
import pytest


@pytest.fixture
def root(tmp_path):
    return tmp_path
