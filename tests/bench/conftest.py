import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def load_benchmark():
    """load_benchmark(NAME) -> benchmarks/NAME.py as a module. The scripts are not a package
    (benchmarks/select.py would shadow the standard library's `select` if their folder were on
    sys.path), so they are loaded by path."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
