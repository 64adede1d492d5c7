"""Every benchmark script loads and has a main(): a renamed helper in bunny or in another
script fails here, not when someone next runs the benchmark."""
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))


def test_the_scripts_are_found():
    assert {"generate", "quantize", "llamacpp_engine", "serve_load"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_loads(load_benchmark, name):
    assert callable(load_benchmark(name).main)
