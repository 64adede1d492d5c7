"""The OpenAI-compatible server against the official `openai` client, on 127.0.0.1."""
import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from bunny.model.generation import SamplingSettings, generate
from bunny.serve.app import ServerSettings, create_app
from bunny.serve.server import running_server
from bunny.testing import make_tiny_bunny, random_image


def data_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text, image=None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image is not None else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def alone(model, processor, text, image, max_tokens) -> str:
    """The library's own answer for one request, run alone."""
    parts = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}])
    return generate(model, processor, [prompt], [[image] if image is not None else []],
                    SamplingSettings(max_new_tokens=max_tokens))[0]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_bunny(seed=3)


@pytest.fixture(scope="module")
def server(tiny):
    app = create_app(*tiny, ServerSettings(model_name="tiny", max_batch_size=16))
    with running_server(app) as s:
        s.app = app
        yield s


def test_non_streaming_with_image_matches_library(server, tiny):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    image = random_image(1)
    r = client.chat.completions.create(model="tiny", messages=[user("What is it?", image)], max_tokens=8,
                                       temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.content == alone(*tiny, "What is it?", image, 8)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 74  # 64 image tokens + the templated question
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == 74 + r.usage.completion_tokens
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_streaming_chunks_equal_non_streaming(server):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [user("Describe the image.", random_image(2)), {"role": "assistant", "content": "A shape."},
                {"role": "user", "content": "And the colour?"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    raw = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                     json={"model": "tiny", "messages": [user("hi")], "max_tokens": 3, "stream": True}).text
    assert raw.startswith("data: {") and raw.endswith("data: [DONE]\n\n")


def test_stop_string_and_seeded_sampling(server, tiny):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    base = client.chat.completions.create(model="tiny", messages=[user("hello")], max_tokens=12, temperature=0)
    text = base.choices[0].message.content
    stop = text[3:5]
    if len(text) > 5 and stop.strip():
        cut = client.chat.completions.create(model="tiny", messages=[user("hello")], max_tokens=12, temperature=0,
                                             stop=[stop])
        assert cut.choices[0].message.content == text[:text.find(stop)].strip()
        assert cut.choices[0].finish_reason == "stop"
    kwargs = dict(model="tiny", messages=[user("hello")], max_tokens=12, temperature=1.0, top_p=0.9)
    a, b = (client.chat.completions.create(seed=7, **kwargs).choices[0].message.content for _ in range(2))
    assert a == b  # same seed, same answer


def test_16_concurrent_requests_each_equal_alone(server, tiny):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    cases = [(f"Question {i}: what is in the image?" if i % 2 else f"Say something {i}.",
              random_image(i) if i % 2 else None, 3 + i % 7) for i in range(16)]
    expected = [alone(*tiny, text, image, n) for text, image, n in cases]
    server.app.state.scheduler.largest_batch = 0
    barrier = threading.Barrier(16)

    def ask(case):
        text, image, n = case
        barrier.wait()  # send together, so they are batched together
        r = client.chat.completions.create(model="tiny", messages=[user(text, image)], max_tokens=n, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, cases))
    assert answers == expected
    assert server.app.state.scheduler.largest_batch > 1  # requests really shared forward passes


def test_queue_full_is_503_with_retry_after(tiny):
    app = create_app(*tiny, ServerSettings(model_name="tiny", max_batch_size=1, max_queue=2))
    scheduler = app.state.scheduler
    with running_server(app) as s:
        scheduler.pause()  # requests queue up; nothing is decoded
        body = {"model": "tiny", "messages": [user("hi")], "max_tokens": 2}
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(httpx.post, s.url + "/v1/chat/completions", json=body, timeout=30)
                       for _ in range(2)]
            deadline = time.monotonic() + 10
            while scheduler.waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
            scheduler.resume()
            assert [f.result().status_code for f in waiting] == [200, 200]
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "server_busy"


def test_graceful_shutdown_finishes_in_flight_request(tiny):
    app = create_app(*tiny, ServerSettings(model_name="tiny"))
    scheduler = app.state.scheduler
    s = running_server(app).__enter__()
    scheduler.pause()
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, s.url + "/v1/chat/completions", timeout=30,
                                json={"model": "tiny", "messages": [user("hi")], "max_tokens": 6})
        while scheduler.waiting < 1:
            time.sleep(0.01)
        stopper = threading.Thread(target=s.shutdown)
        stopper.start()  # like SIGTERM: stop accepting, wait for the request in flight
        time.sleep(0.3)
        scheduler.resume()
        response = in_flight.result()
    stopper.join(30)
    s.sock.close()
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert not s.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)
