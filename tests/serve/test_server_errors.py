"""Every bad request gets its status and an OpenAI-shaped error; the server stays up."""
import base64
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bunny.serve.app import ServerSettings, create_app
from bunny.serve.images import ImageLimits
from bunny.serve.server import running_server
from bunny.testing import make_tiny_bunny, random_image
from tests.serve.test_server import data_url, user

KEY = "sk-test"


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb's first bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def b64_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def image_site():
    """A local HTTP server with a small and a large 'image' (remote-image tests; 127.0.0.1 only)."""
    import io
    buf = io.BytesIO()
    random_image(0).save(buf, format="PNG")
    files = {"/small.png": buf.getvalue(), "/big.png": b"\0" * 300_000}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            data = files.get(self.path)
            self.send_response(200 if data else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server():
    model, processor = make_tiny_bunny(seed=5)
    settings = ServerSettings(model_name="tiny", api_key=KEY, max_new_tokens_cap=32, max_body_bytes=200_000,
                              images=ImageLimits(max_bytes=100_000, max_pixels=1000 * 1000, max_images=2))
    with running_server(create_app(model, processor, settings)) as s:
        yield s


def post(server, body=None, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30, **kwargs)


def request(*parts, **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": list(parts) + [{"type": "text", "text": "hi"}]}],
            "max_tokens": 2, **extra}


def check(response, status, words, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    if code:
        assert error["code"] == code


def test_bad_requests(server):
    check(post(server, request(), key=None), 401, "missing API key", "invalid_api_key")
    check(post(server, request(), key="sk-wrong"), 401, "incorrect API key")
    check(httpx.get(server.url + "/v1/models", timeout=10), 401, "missing API key")
    check(post(server, request() | {"model": "gpt-4o"}), 404, "does not exist", "model_not_found")
    check(post(server, request(max_tokens=33)), 400, "over this server's cap of 32", "max_tokens_over_cap")
    check(post(server, request(max_tokens=0)), 400, "max_tokens")
    check(post(server, request(image_part("data:image/png;base64,%%%not-base64"))), 400, "malformed base64")
    check(post(server, request(image_part(b64_url(b"hello, not an image")))), 400, "not a readable image")
    check(post(server, request(image_part(b64_url(png_header_claiming(2000, 2000))))), 400,
          "2000x2000 = 4000000 pixels, over the limit of 1000000")
    check(post(server, request(image_part(b64_url(png_header_claiming(30000, 30000))))), 400,
          "too large to decode")  # past PIL's own bomb limit: refused while reading the header
    check(post(server, request(image_part(b64_url(b"\0" * 120_000)))), 400, "over the limit of 100000")
    three = [image_part(data_url(random_image(i))) for i in range(3)]
    check(post(server, request(*three)), 400, "3 images, over the limit of 2", "too_many_images")
    check(post(server, request(image_part("file:///etc/passwd"))), 400, "must be data: URLs")
    check(post(server, request(image_part("http://127.0.0.1:9/x.png"))), 400, "remote image URLs are disabled")
    check(post(server, request(image_part("data:text/plain;base64,aGk="))), 400, "is not an image")
    check(post(server, {"model": "tiny", "messages": []}), 400, "messages")
    check(post(server, {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}), 400, "role")
    check(post(server, None, content=b"{not json"), 400, "invalid request")
    check(post(server, request(n=2)), 400, "n")
    check(post(server, request(stop=["a", "b", "c", "d", "e"])), 400, "at most 4 stop strings")
    check(post(server, {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 3000}]}), 400,
          "longer than the limit")
    big = b"x" * 250_000
    check(httpx.post(server.url + "/v1/chat/completions", content=big, timeout=10,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}),
          413, "over the limit of 200000 bytes", "request_too_large")

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(30):
            yield b"x" * 10_000
    check(httpx.post(server.url + "/v1/chat/completions", content=chunked(), timeout=10,
                     headers={"Authorization": f"Bearer {KEY}"}), 413, "over the limit")
    check(httpx.get(server.url + "/v1/nothing-here", timeout=10), 404, "Not Found")
    # still up, still answering
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    ok = post(server, request(image_part(data_url(random_image(3)))))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_untrained_projector_refuses_images():
    model, processor = make_tiny_bunny(seed=1, projector_trained=False)
    with running_server(create_app(model, processor, ServerSettings(model_name="plain"))) as s:
        body = request(image_part(data_url(random_image(0)))) | {"model": "plain"}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
        check(r, 400, "projector is untrained", "images_not_supported")
        text_only = httpx.post(s.url + "/v1/chat/completions", json=request() | {"model": "plain"}, timeout=30)
        assert text_only.status_code == 200


def test_remote_images_only_when_allowed_and_within_limits(image_site):
    model, processor = make_tiny_bunny(seed=2)
    settings = ServerSettings(model_name="tiny", images=ImageLimits(allow_remote=True, max_bytes=200_000,
                                                                    remote_timeout_s=5))
    with running_server(create_app(model, processor, settings)) as s:
        def ask(url):
            return httpx.post(s.url + "/v1/chat/completions", json=request(image_part(url)), timeout=30)
        assert ask(image_site + "/small.png").status_code == 200
        check(ask(image_site + "/big.png"), 400, "over the limit of 200000")
        check(ask(image_site + "/missing.png"), 400, "HTTP 404")
        check(ask("http://127.0.0.1:9/refused.png"), 400, "cannot fetch the image")
