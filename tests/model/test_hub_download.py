"""Hub ids downloaded for real: huggingface_hub's own download code talks to a small local
server that answers as the hub's HTTP API does (repo info, file tree, resolve), so what is
requested, what lands in the cache, and how refusals read are those of a real download.
The client runs in a subprocess configured by huggingface_hub's documented env vars."""
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from bunny.errors import BunnyError
from bunny.model.loading import load_pretrained
from bunny.testing import make_tiny_bunny, random_image

COMMIT = "a" * 40
CLIENT = """
import json, sys
from bunny.errors import BunnyError
from bunny.model.hub import local_or_hub
out = []
for repo, revision in json.loads(sys.argv[1]):
    try:
        out.append(str(local_or_hub(repo, revision)))
    except BunnyError as exc:
        out.append("error: " + str(exc))
print(json.dumps(out))
"""


class FakeHub(BaseHTTPRequestHandler):
    """The hub's answers for model repos: `repos` maps id -> {path: bytes}; one commit, branch main."""

    repos: dict = {}
    gated: set = set()
    downloads: list = []

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _refuse(self, repo_id: str, revision: str) -> bool:
        if repo_id not in self.repos:
            self._send(401, headers={"X-Error-Code": "RepoNotFound"})
        elif repo_id in self.gated:
            self._send(403, headers={"X-Error-Code": "GatedRepo"})
        elif revision not in ("main", COMMIT):
            self._send(404, headers={"X-Error-Code": "RevisionNotFound"})
        else:
            return False
        return True

    def do_GET(self):
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo_id, action, revision = "/".join(parts[2:4]), parts[4], parts[5]
            if self._refuse(repo_id, revision):
                return
            files = self.repos[repo_id]
            if action == "revision":
                info = {"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": p} for p in files]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            tree = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for p, b in files.items()]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if self._refuse(repo_id, revision):
            return
        body = self.repos[repo_id].get(path)
        if body is None:
            return self._send(404, headers={"X-Error-Code": "EntryNotFound"})
        if self.command == "GET":
            self.downloads.append(path)
        self._send(200, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'})

    do_HEAD = do_GET


@pytest.fixture
def fake_hub(tmp_path, hub_cache):
    model, processor = make_tiny_bunny(seed=7)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="100KB")  # shards and an index, as large models are
    processor.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    extras = {"modeling_bunny.py": b"raise RuntimeError('remote code must never run')\n",
              "pytorch_model.bin": b"a pickled twin of the shards", "consolidated.safetensors": b"an unindexed copy",
              "model-q4.gguf": b"GGUF", "onnx/model.onnx": b"onnx", "README.md": b"# tiny bunny\n"}
    FakeHub.repos = {"org/tiny-bunny": files | extras, "org/gated": dict(files)}
    FakeHub.gated = {"org/gated"}
    FakeHub.downloads = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}", hub_cache
    server.shutdown()
    server.server_close()


def _client(endpoint: str, cache: Path, requests: list) -> list[str]:
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "NO_PROXY": "127.0.0.1", "HF_TOKEN": "", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    run = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(requests)], capture_output=True, text=True,
                         timeout=300, env=os.environ | env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _logits(model, processor):
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}])
    with torch.no_grad():
        return model(**processor(text=text, images=[random_image(1)])).logits


def test_download_fetches_only_what_a_checkpoint_needs_then_serves_offline(fake_hub):
    folder, endpoint, hub_cache = fake_hub
    [path] = _client(endpoint, hub_cache.root, [["org/tiny-bunny", None]])
    snapshot = Path(path)
    assert snapshot == hub_cache.root / "models--org--tiny-bunny" / "snapshots" / COMMIT
    needed = {p.name for p in folder.iterdir()}
    assert len(needed) > 5 and sorted(FakeHub.downloads) == sorted(needed)  # only configs, tokenizer, indexed shards
    assert {p.name for p in snapshot.iterdir()} == needed
    # Offline (this process: HF_HUB_OFFLINE=1), from the cache the download filled.
    torch.testing.assert_close(_logits(*load_pretrained("org/tiny-bunny")), _logits(*load_pretrained(folder)),
                               rtol=0, atol=0)
    torch.testing.assert_close(_logits(*load_pretrained("org/tiny-bunny", revision=COMMIT)),
                               _logits(*load_pretrained(folder)), rtol=0, atol=0)


def test_a_half_downloaded_snapshot_is_not_used(fake_hub):
    folder, endpoint, hub_cache = fake_hub
    [path] = _client(endpoint, hub_cache.root, [["org/tiny-bunny", None]])
    last = sorted(Path(path).glob("model-*.safetensors"))[-1]
    last.unlink()  # as if the download stopped before the last shard
    with pytest.raises(BunnyError, match=rf"model 'org/tiny-bunny': the cached snapshot is incomplete.*{last.name}"
                       ):
        load_pretrained("org/tiny-bunny")


def test_refusals_of_the_hub_name_the_id(fake_hub):
    _, endpoint, hub_cache = fake_hub
    missing, gated, revision = _client(endpoint, hub_cache.root, [["org/no-such-model", None], ["org/gated", None],
                                                                  ["org/tiny-bunny", "no-such-branch"]])
    assert missing.startswith("error: model 'org/no-such-model': no local folder of that name, and no hub repo")
    assert gated.startswith("error: model 'org/gated': the hub repo is gated; accept its conditions at "
                            "https://huggingface.co/org/gated")
    assert revision == ("error: model 'org/tiny-bunny' at revision 'no-such-branch': the hub repo 'org/tiny-bunny' "
                        "has no revision 'no-such-branch' (branch, tag or commit)")
    assert FakeHub.downloads == []
    assert not (hub_cache.root / "models--org--gated" / "snapshots").exists()
