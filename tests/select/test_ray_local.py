"""`ray_local.lean_start` on stand-ins for Ray's private modules (no Ray started): each
patch applies only where the attribute exists and everything is restored, also after an
error; the prompt node wait falls back to Ray's own call."""
from types import SimpleNamespace

import pytest

from bunny.select import ray_local


class _Base:
    def start_monitor(self):
        return "monitor"


class _Node(_Base):  # start_monitor inherited, start_log_monitor missing
    def start_api_server(self, *, include_dashboard, raise_on_failure):
        return "api"


def _fake_ray():
    def get_node(addr, node_id):
        return {"node": node_id}

    return SimpleNamespace(_private=SimpleNamespace(node=SimpleNamespace(Node=_Node),
                                                    services=SimpleNamespace(get_node=get_node)))


def test_lean_start_patches_what_exists_and_restores():
    ray = _fake_ray()
    get_node = ray._private.services.get_node
    with ray_local.lean_start(ray) as applied:
        assert sorted(applied) == ["get_node", "start_api_server", "start_monitor"]
        assert _Node().start_api_server(include_dashboard=False, raise_on_failure=False) is None
        assert _Node().start_monitor() is None
        assert _Base().start_monitor() == "monitor"  # the base class is untouched
    assert "start_monitor" not in vars(_Node)  # inherited again, not copied onto the subclass
    assert _Node().start_monitor() == "monitor"
    assert _Node().start_api_server(include_dashboard=False, raise_on_failure=False) == "api"
    assert ray._private.services.get_node is get_node


def test_lean_start_restores_after_an_error():
    ray = _fake_ray()
    with pytest.raises(RuntimeError):
        with ray_local.lean_start(ray):
            raise RuntimeError("ray.init failed")
    assert _Node().start_api_server(include_dashboard=False, raise_on_failure=False) == "api"


def test_lean_start_without_ray_private_modules_changes_nothing():
    with ray_local.lean_start(SimpleNamespace()) as applied:
        assert applied == []


def test_prompt_get_node_falls_back_to_rays_wait(monkeypatch):
    """Where the fast poll cannot run (here the GCS client fails), Ray's own call answers."""
    import ray._raylet

    def broken(*a, **k):
        raise ConnectionError("no GCS")

    monkeypatch.setattr(ray._raylet, "GcsClient", broken)
    calls = []
    wrapped = ray_local._prompt_get_node(lambda addr, node: calls.append((addr, node)) or {"ok": node})
    assert wrapped("127.0.0.1:1", "ab") == {"ok": "ab"}
    assert calls == [("127.0.0.1:1", "ab")]


class _Context:
    """Records what Ray's serialization add-ons register."""

    def __init__(self):
        self.types = []

    def _register_cloudpickle_serializer(self, cls, **kwargs):
        self.types.append(cls.__module__.split(".")[0])

    def _register_cloudpickle_reducer(self, cls, reducer):
        self.types.append(cls.__module__.split(".")[0])


def test_lean_serialization_registers_only_for_imported_libraries(monkeypatch):
    """Without pydantic, starlette and pyarrow imported, nothing is registered and nothing is
    imported; with them imported, Ray's own registrations run; `restore` puts Ray's back."""
    import sys

    pytest.importorskip("ray")
    import pyarrow  # noqa: F401 - imported below: the add-ons register for them
    import pydantic  # noqa: F401
    import starlette.datastructures  # noqa: F401
    from ray.util import serialization_addons as addons

    original = addons.apply
    restore = ray_local.lean_serialization()
    try:
        assert restore is not None and addons.apply is not original and addons.apply.bunny_lean
        assert ray_local.lean_serialization() is None  # already lean: no second patch
        for name in ("pydantic", "starlette", "pyarrow"):
            monkeypatch.delitem(sys.modules, name)
        none = _Context()
        addons.apply(none)
        assert none.types == [] and not {"pydantic", "starlette", "pyarrow"} & set(sys.modules)
        monkeypatch.undo()
        lean, full = _Context(), _Context()
        addons.apply(lean)
        original(full)
        assert sorted(lean.types) == sorted(full.types) and {"pydantic", "starlette", "pyarrow"} <= set(full.types)
    finally:
        restore()
    assert addons.apply is original
