"""Imported first by each worker of the engine's local Ray (`ray_local.PRELOAD`), before
its first task: Ray's serialization add-ons register only for libraries the worker has
imported (`ray_local.lean_serialization`; the worker serves this run only)."""
from bunny.select.ray_local import lean_serialization

lean_serialization()
