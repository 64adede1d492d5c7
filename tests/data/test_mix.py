"""Mixture rules (pure) and `bunny data mix` end to end on tiny files."""
import json

import pytest

from bunny.cli import main
from bunny.data.mix import Source, add_suffix, apply_rules, build_mixture, subsample
from bunny.errors import BunnyError


def recs(prefix, n):
    return [{"id": f"{prefix}{i}", "conversations": [{"from": "human", "value": f"q{i}"},
                                                     {"from": "gpt", "value": "a"}]} for i in range(n)]


def test_suffix_goes_on_every_human_turn_only():
    out = add_suffix(recs("x", 1), "Please answer the question in detail.")
    assert out[0]["conversations"][0]["value"] == "q0 Please answer the question in detail."
    assert out[0]["conversations"][1]["value"] == "a"


def test_cap_is_seeded_and_keeps_order():
    rows = recs("x", 100)
    a, b = subsample(rows, 10, 0, "s"), subsample(rows, 10, 0, "s")
    assert a == b and len(a) == 10 and a != subsample(rows, 10, 1, "s")
    ids = [int(r["id"][1:]) for r in a]
    assert ids == sorted(ids)


def test_rules_drop_then_cap_and_count():
    rows = recs("svit", 10) + recs("sharegpt", 5)
    out, counts = apply_rules(Source("s", "p", drop_id_prefix="sharegpt", cap=4), rows, seed=0)
    assert all(r["id"].startswith("svit") for r in out)
    assert counts == {"read": 15, "dropped": 5, "sampled_out": 6, "written": 4}


def test_replace_subset_end_to_end(tmp_path, capsys):
    (tmp_path / "svit.json").write_text(json.dumps(recs("svit", 6) + recs("sgpt", 3)))
    (tmp_path / "sharegpt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs("sgpt", 3)))
    (tmp_path / "wizard.json").write_text(json.dumps(recs("wiz", 4)))
    (tmp_path / "allava.json").write_text(json.dumps(recs("allava", 8)))
    (tmp_path / "mix.yaml").write_text(
        "seed: 0\noutput: out/mix.json\nsources:\n"
        "  - {name: svit, path: svit.json, drop_ids_from: sharegpt.jsonl}\n"
        "  - {name: wizardlm, path: wizard.json}\n"
        "  - {name: allava, path: allava.json, suffix: Please answer the question in detail., cap: 2}\n")
    assert main(["data", "mix", str(tmp_path / "mix.yaml")]) == 0
    mixture = json.loads((tmp_path / "out" / "mix.json").read_text())
    report = json.loads((tmp_path / "out" / "mix.report.json").read_text())
    assert report["sources"]["svit"] == {"read": 9, "dropped": 3, "sampled_out": 0, "written": 6}
    assert report["total"] == len(mixture) == 6 + 4 + 2
    assert not any(r["id"].startswith("sgpt") for r in mixture)
    assert all(r["conversations"][0]["value"].endswith("in detail.") for r in mixture if r["id"].startswith("allava"))
    # the same recipe gives the same mixture
    build_mixture(tmp_path / "mix.yaml")
    assert json.loads((tmp_path / "out" / "mix.json").read_text()) == mixture


def test_bad_recipes(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(recs("x", 2)))
    (tmp_path / "m.yaml").write_text("output: o.json\nsources:\n  - {name: a, path: a.json, capp: 3}\n")
    with pytest.raises(BunnyError, match="capp.*valid"):
        build_mixture(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text("output: o.json\nsources:\n  - {name: a, path: a.json}\n  - {name: b, path: a.json}\n")
    with pytest.raises(BunnyError, match="appears in both 'a' and 'b'"):
        build_mixture(tmp_path / "m.yaml")
