"""A lean local Ray for `--engine ray` without `--address`: GCS, raylet (with its two
agents) and workers, nothing else.

`ray.init()` on one machine also starts, and waits for, processes a batch selection never
uses: the dashboard's API server (with `include_dashboard=False` it still starts one, to
host usage reporting, and `ray.init` polls until it is up), the autoscaler monitor (it
manages no machines here) and the log monitor (it streams worker logs to the driver, which
this engine turns off with `log_to_driver=False`). On 2 cores they are Python processes
competing with the ones Ray does wait for, and measured ~1 s of a 250k-row selection's
~7.5 s start to finish. Ray has no public switch for them, so `lean_start` replaces the
three `Node` methods that start them with no-ops for the duration of this run's own
`ray.init` (restored after; a cluster joined with `--address` is untouched).

It also works around two fixed waits in Ray's start (see LOCAL_SYSTEM_CONFIG and
`_prompt_get_node`), and keeps Ray's serialization add-ons from importing libraries the run
does not send (`lean_serialization`). All of this reaches into Ray's private modules: each
patch is applied only where what it replaces exists, so on a Ray version without it the
plain start runs (same result, only slower); `tests/select/test_ray.py` checks that on the
pinned version every patch applied and the run still gives the embedded engine's output."""
from __future__ import annotations

import importlib.util
import sys
import time
from contextlib import contextmanager

# Ray settings of the local Ray (a joined cluster keeps its own):
# - its raylet connects to its own object store as soon as it has started it; when the
#   store is not yet listening it sleeps `raylet_client_connect_timeout_milliseconds` (1 s
#   by default) before the next try, which most starts here hit. Retrying every 50 ms, 200
#   times, keeps Ray's 10 s limit.
# - workers import the cluster kernel's modules (ONNX Runtime included) before they accept
#   work, while the driver is still connecting, rather than in their first task; the first,
#   `ray_worker`, makes Ray's serialization add-ons lean in the worker (`lean_serialization`).
PRELOAD = ["bunny.select.ray_worker", "bunny.select.kernel", "bunny.select.int8", "bunny.select.ort_ops",
           "onnxruntime", "threadpoolctl"]
LOCAL_SYSTEM_CONFIG = {"raylet_client_connect_timeout_milliseconds": 50, "raylet_client_num_connect_attempts": 200,
                       "preload_python_modules": PRELOAD}
NODE_WAIT_S = 30.0  # Ray's own limit for a raylet to register (raylet_start_wait_time_s)
SKIPPED = ("start_api_server", "start_monitor", "start_log_monitor")  # Node methods made no-ops
_INHERITED = object()


def start_local(ray, workers: int) -> list[str]:
    """`ray.init` of a lean local Ray with `workers` CPUs; returns the patches applied
    (names, for the tests)."""
    with lean_start(ray) as applied:
        ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                 _system_config=LOCAL_SYSTEM_CONFIG)
    return applied


@contextmanager
def lean_start(ray):
    """Within: Ray's `Node` skips the processes in SKIPPED and the driver's wait for its
    raylet polls every 20 ms. Yields the names of the patches applied."""
    private = getattr(ray, "_private", None)
    node_cls = getattr(getattr(private, "node", None), "Node", None)
    services = getattr(private, "services", None)
    patches = [(node_cls, name, _skip) for name in SKIPPED]
    original_get_node = getattr(services, "get_node", None)
    if original_get_node is not None:
        patches.append((services, "get_node", _prompt_get_node(original_get_node)))
    saved = []  # (owner, name, its own attribute or _INHERITED)
    try:
        for owner, name, replacement in patches:
            if owner is not None and hasattr(owner, name):
                saved.append((owner, name, vars(owner).get(name, _INHERITED)))
                setattr(owner, name, replacement)
        yield [name for _, name, _ in saved]
    finally:
        for owner, name, value in reversed(saved):
            if value is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def _skip(self, *args, **kwargs):
    return None


def _prompt_get_node(original):
    """Ray's `services.get_node`, called by the driver to wait for its raylet to register,
    looks every 1 s (a C++ loop): the raylet, up ~0.7 s after it is started here, was seen
    up to 1 s late. This polls the node table every 20 ms first; Ray's own call then
    answers at once. Where the poll fails, Ray's wait runs unchanged and reports any
    problem."""

    def get_node(gcs_address, node_id):
        try:
            from ray._raylet import GcsClient

            client = GcsClient(address=gcs_address)
            deadline = time.monotonic() + NODE_WAIT_S
            while time.monotonic() < deadline:
                if any(n.hex() == node_id for n in client.get_all_node_info(timeout=NODE_WAIT_S)):
                    break
                time.sleep(0.02)
        except Exception:  # noqa: BLE001 - Ray's own wait below reports any real problem
            pass
        return original(gcs_address, node_id)

    return get_node


def lean_serialization():
    """Ray's serialization add-ons, registered only for the libraries this process has
    already imported. Returns a function restoring Ray's own, or None where this Ray lacks
    the pieces (then nothing changes).

    Each Ray process builds its serialization context on first use (the driver's first
    `ray.put`, a worker's first task) and `ray.util.serialization_addons.apply` then imports
    pydantic, starlette and pyarrow.json, when installed, to register serializers for their
    types: ~0.1 s per process on 2 cores, in the way of the first tasks, for objects the
    selection never sends (numpy arrays, paths, small dataclasses). An object of those types
    can only exist in a process that imported its library, so registering only for imported
    ones changes nothing for what is sent. Used by the local Ray's workers (`ray_worker`,
    for their lifetime: they serve this run only) and by the driver while `RayMap` holds
    the connection it made (restored when it closes)."""
    try:
        from ray.util import serialization_addons as addons
    except ImportError:  # pragma: no cover - ray is in the select extra
        return None
    original = getattr(addons, "apply", None)
    starlette = getattr(addons, "register_starlette_serializer", None)
    if (original is None or starlette is None or getattr(original, "bunny_lean", False)
            or importlib.util.find_spec("ray._common.pydantic_compat") is None
            or importlib.util.find_spec("ray._private.arrow_serialization") is None):
        return None

    def apply(context):
        if "pydantic" in sys.modules:
            from ray._common.pydantic_compat import register_pydantic_serializers

            register_pydantic_serializers(context)
        if "starlette" in sys.modules:
            starlette(context)
        if "pyarrow" in sys.modules and sys.platform != "win32":
            from ray._private.arrow_serialization import _register_custom_datasets_serializers

            _register_custom_datasets_serializers(context)

    apply.bunny_lean = True
    addons.apply = apply

    def restore():
        addons.apply = original

    return restore
