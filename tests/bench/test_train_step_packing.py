"""benchmarks/train_step.py's packing mode: the length mix is what its docs say (the share of
long conversations, one image per sample, round counts), seeded, and every sample loads and
tokenises through the trainer's own data path."""
import json

import pytest

from bunny.data.llava import ConversationDataset, load_conversations
from bunny.testing import make_tiny_bunny


@pytest.fixture(scope="module")
def ts(load_benchmark):
    return load_benchmark("train_step")


def test_mix_shares_rounds_and_images(ts, tmp_path):
    path = ts.mix_records(tmp_path / "a", 200, long_share=0.4, seed=1)
    records = json.loads(path.read_text())
    turns = [len(r["conversations"]) // 2 for r in records]
    assert len(records) == 200 and set(turns) <= {1, 3, 4, 5, 6}
    assert 0.3 < sum(t > 1 for t in turns) / 200 < 0.5  # 40% long, drawn
    assert all(r["conversations"][0]["value"].startswith("<image>\n") and (tmp_path / "a" / r["image"]).is_file()
               for r in records)
    short = [len(r["conversations"][1]["value"].split()) for r, t in zip(records, turns) if t == 1]
    assert min(short) >= 1 and max(short) <= 3
    assert ts.mix_records(tmp_path / "b", 200, long_share=0.4, seed=1).read_text() == path.read_text()
    _, processor = make_tiny_bunny()
    convs, _ = load_conversations(path)
    lengths = ConversationDataset(convs, processor, "bunny", "pad", max_length=10 ** 6).lengths
    long = [n for n, t in zip(lengths, turns) if t > 1]
    assert min(long) > 2 * max(n for n, t in zip(lengths, turns) if t == 1)  # two length groups
