"""The prediction file contract and `bunny eval score`."""
import json

import pytest

from bunny.cli import main
from bunny.errors import BunnyError
from bunny.eval.records import load_predictions


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_missing_field_names_line_and_field(tmp_path):
    f = _write(tmp_path / "p.jsonl", [dict(question_id=1, prediction="a", answer="a"),
                                      dict(question_id=2, prediction="b")])
    with pytest.raises(BunnyError, match=r"p\.jsonl:2: missing field 'answer'"):
        load_predictions("gqa", f)


def test_duplicate_question_id(tmp_path):
    row = dict(question_id="q1", prediction="a", answer="a")
    f = _write(tmp_path / "p.jsonl", [row, row])
    with pytest.raises(BunnyError, match=r":2: duplicate question_id 'q1' \(first at .*:1\)"):
        load_predictions("gqa", f)


def test_unknown_category_lists_valid_ones(tmp_path):
    f = _write(tmp_path / "p.jsonl", [dict(question_id=1, prediction="yes", answer="yes",
                                           category="randm")])
    with pytest.raises(BunnyError, match="unknown category 'randm'; valid: random, popular"):
        load_predictions("pope", f)


def test_bad_json_and_wrong_types(tmp_path):
    with pytest.raises(BunnyError, match=":1: not valid JSON"):
        load_predictions("gqa", _write(tmp_path / "a.jsonl", ["{oops"]))
    with pytest.raises(BunnyError, match="'answers' must be a list"):
        load_predictions("vqav2", _write(tmp_path / "b.jsonl", [
            dict(question_id=1, prediction="a", answers="a")]))
    with pytest.raises(BunnyError, match="no predictions"):
        load_predictions("gqa", _write(tmp_path / "c.jsonl", []))


def test_cli_score_prints_one_json_object(tmp_path, capsys):
    f = _write(tmp_path / "gqa.jsonl", [dict(question_id=1, prediction="Table.", answer="table"),
                                        dict(question_id=2, prediction="chair", answer="table")])
    assert main(["eval", "score", "gqa", str(f)]) == 0
    assert json.loads(capsys.readouterr().out) == {"accuracy": 50.0}


def test_cli_reference_fallback(tmp_path, capsys):
    rows = [dict(question_id=i, prediction="no idea", answer="A", question_type="multiple-choice",
                 options=["x", "y"]) for i in range(4)]
    f = _write(tmp_path / "mmmu.jsonl", rows)
    assert main(["eval", "score", "mmmu", str(f), "--reference-fallback", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unparseable"] == 4 and out["fallback_seed"] == 1


def test_cli_errors_exit_2(tmp_path, capsys):
    f = _write(tmp_path / "p.jsonl", [dict(question_id=1, prediction="a", answer="a")])
    assert main(["eval", "score", "nope", str(f)]) == 2
    assert "unknown benchmark 'nope'; valid: mme" in capsys.readouterr().err
