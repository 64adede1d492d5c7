"""`serve(...)`: load a model and run the HTTP server until interrupted (what `bunny serve` calls)."""
from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import torch

from bunny.errors import BunnyError

log = logging.getLogger("bunny.serve")
GRACEFUL_SHUTDOWN_S = 120  # in-flight requests get this long to finish after SIGINT/SIGTERM


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
          max_new_tokens_cap: int = 1024, max_images: int = 4, max_image_pixels: int = 4096 * 4096,
          max_body_bytes: int = 20 * 2**20, allow_remote_images: bool = False, quantize: str | None = None,
          group_size: int | None = None, engine: str = "torch", gguf: str | None = None, mmproj: str | None = None,
          template: str | None = None, model_base: str | None = None, vision_tower: str | None = None,
          device: str = "cpu",
          dtype: str | None = None) -> None:
    import uvicorn

    from bunny.serve.app import ServerSettings, create_app
    from bunny.serve.images import ImageLimits
    from bunny.serve.quantize import load_quantized

    if not _is_loopback(host) and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    scheduler = None
    if engine == "llama.cpp":  # one request at a time (LlamaCppScheduler)
        from bunny.serve.llamacpp_engine import export_outtype, open_engine, serving

        if quantize:
            raise BunnyError("--engine llama.cpp takes no --quantize: the GGUF's types are its own")
        engine_and_processor = open_engine(model, gguf, mmproj, export_outtype(dtype, gguf), template=template)
        loaded, processor, scheduler = serving(*engine_and_processor, max_queue)
    if scheduler is None:
        loaded, processor = load_quantized(model, quantize, group_size, device,
                                           dtype=getattr(torch, dtype) if dtype else None, model_base=model_base,
                                           template=template, vision_tower=vision_tower)
    settings = ServerSettings(
        model_name=served_model_name or Path(str(model).rstrip("/")).name,
        api_key=api_key, max_batch_size=max_batch_size, max_queue=max_queue, max_new_tokens_cap=max_new_tokens_cap,
        max_body_bytes=max_body_bytes,
        images=ImageLimits(max_pixels=max_image_pixels, max_images=max_images, allow_remote=allow_remote_images),
    )
    app = create_app(loaded, processor, settings, scheduler=scheduler)
    print(f"bunny: serving {settings.model_name!r} on http://{host}:{port} (demo at /, API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, log_level="info")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class running_server:
    """Run an app on 127.0.0.1 in a background thread (tests, benchmarks, notebooks).

        with running_server(app) as server:
            httpx.get(server.url + "/health")

    The port is chosen by the OS and bound before the thread starts, so there is no race.
    `server.shutdown()` is the graceful path: in-flight requests finish first.
    """

    def __init__(self, app, host: str = "127.0.0.1", graceful_timeout_s: float = 60):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_timeout_s)
        self.server = uvicorn.Server(config)
        self.thread = None

    def __enter__(self) -> "running_server":
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def shutdown(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.sock.close()
