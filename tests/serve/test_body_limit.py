"""Bodies over the limit get an OpenAI-shaped 413 on a real uvicorn server, never a reset,
whatever the client does: send everything before reading, stream it in chunks, or ask
`Expect: 100-continue` first."""
import json
import socket

import httpx
import pytest
import requests

from bunny.serve.app import ServerSettings, create_app
from bunny.serve.server import running_server
from bunny.testing import make_tiny_bunny

LIMIT = 1_000_000
BIG = b"x" * (60 * 2**20)  # 60 MB, far more than the socket buffers hold


@pytest.fixture(scope="module")
def server():
    model, processor = make_tiny_bunny(seed=4)
    with running_server(create_app(model, processor, ServerSettings(model_name="tiny", max_body_bytes=LIMIT))) as s:
        yield s


def raw_post(server, headers: dict, body: bytes) -> bytes:
    """Send the request line, headers and the whole body, and only then read the answer."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n{head}\r\n".encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def check_413(status: int, body: bytes) -> None:
    assert status == 413
    assert json.loads(body) == {"error": {"message": f"the request body is over the limit of {LIMIT} bytes",
                                          "type": "invalid_request_error", "param": None,
                                          "code": "request_too_large"}}


def split(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_60mb_body_sent_whole_before_reading_gets_413_json(server):
    status, headers, body = split(raw_post(server, {"Content-Type": "application/json",
                                                    "Content-Length": str(len(BIG))}, BIG))
    check_413(status, body)
    assert headers["content-type"] == "application/json"


def test_60mb_body_from_httpx_and_requests(server):
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=BIG, headers={"Content-Type": "application/json"}, timeout=60)
    check_413(r.status_code, r.content)
    chunks = (BIG[i:i + 2**20] for i in range(0, len(BIG), 2**20))  # chunked: no Content-Length
    r = httpx.post(url, content=chunks, timeout=60)
    check_413(r.status_code, r.content)
    r = requests.post(url, data=BIG, headers={"Content-Type": "application/json"}, timeout=60)
    check_413(r.status_code, r.content)
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"  # still serving


def test_expect_100_continue_is_refused_before_the_body_is_sent(server):
    headers = {"Content-Length": str(len(BIG)), "Expect": "100-continue"}
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                     + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # the server answers and closes without waiting for the body
            answer += chunk
    status, _, body = split(answer)
    check_413(status, body)


def test_body_under_the_limit_still_reaches_the_route(server):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                       "pad": "y" * (LIMIT - 200)}).encode()
    assert len(body) <= LIMIT
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
