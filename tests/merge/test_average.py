import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bunny.errors import BunnyError
from bunny.merge.average import RECORD_FILE, average_models
from bunny.model.loading import load_pretrained
from bunny.testing import save_tiny_bunny


def _state(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state |= load_file(str(f))
    return state


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    m1 = save_tiny_bunny(root / "m1", seed=1)
    m2 = save_tiny_bunny(root / "m2", seed=2, template="llama")  # a non-architectural difference
    return m1, m2


def test_merged_tensors_equal_weighted_sum_and_load(two_models, tmp_path):
    m1, m2 = two_models
    out = average_models([m1, m2], [0.3, 0.7], tmp_path / "avg")
    s1, s2, merged = _state(m1), _state(m2), _state(out)
    assert set(merged) == set(s1) == set(s2)
    for key in merged:
        torch.testing.assert_close(merged[key], 0.3 * s1[key] + 0.7 * s2[key], rtol=0, atol=1e-6)
    record = json.loads((out / RECORD_FILE).read_text())
    assert [i["weight"] for i in record["inputs"]] == [0.3, 0.7]
    assert record["config_from"].endswith("m2")
    assert any("template" in line for line in record["config_fields_taken_from_last"])
    model, processor = load_pretrained(out)  # config, tokenizer, processor from M2
    assert model.config.template == "llama" and processor.template == "llama"


def test_three_models_small_shards_and_unnormalized(two_models, tmp_path):
    m1, m2 = two_models
    with pytest.raises(BunnyError, match="sum to 1.5"):
        average_models([m1, m2, m1], [0.5, 0.5, 0.5], tmp_path / "bad")
    out = average_models([m1, m2, m1], [0.5, 0.5, 0.5], tmp_path / "avg3", allow_unnormalized=True,
                         max_shard_size="20KB", chunk_size="1KB")  # many shards, tensors in many pieces
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    s1, s2, merged = _state(m1), _state(m2), _state(out)
    for key in merged:
        torch.testing.assert_close(merged[key], 1.0 * s1[key] + 0.5 * s2[key], rtol=0, atol=1e-6)
    load_pretrained(out)  # the sharded output loads strictly


def test_different_architectures_list_mismatches(two_models, tmp_path):
    m1, _ = two_models
    other = save_tiny_bunny(tmp_path / "qwen", family="qwen2")
    with pytest.raises(BunnyError, match="do not share one architecture") as err:
        average_models([m1, other], [0.5, 0.5], tmp_path / "x")
    assert "text_config.model_type" in str(err.value)
    assert not (tmp_path / "x").exists()


def test_shape_mismatch_named(two_models, tmp_path):
    m1, m2 = two_models
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((m2 / "config.json").read_text())
    state = _state(m2)
    state["mm_projector.0.bias"] = torch.zeros(5)
    del state["mm_projector.2.bias"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(BunnyError) as err:
        average_models([m1, bad], [0.5, 0.5], tmp_path / "x")
    msg = str(err.value)
    assert "mm_projector.0.bias: shape [32]" in msg and "mm_projector.2.bias: in" in msg


def test_weight_count_and_missing_folder(two_models, tmp_path):
    m1, m2 = two_models
    with pytest.raises(BunnyError, match="2 weights for 3 models"):
        average_models([m1, m2, m1], [0.5, 0.5], tmp_path / "x")
    with pytest.raises(BunnyError, match="at least two"):
        average_models([m1], [1.0], tmp_path / "x")
    with pytest.raises(BunnyError, match="not found"):
        average_models([m1, tmp_path / "nope"], [0.5, 0.5], tmp_path / "x")


def test_cli_average_and_error(two_models, tmp_path, capsys):
    from bunny.cli import main

    m1, m2 = two_models
    assert main(["merge", "average", str(m1), str(m2), "--weights", "0.42", "0.58", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert main(["merge", "average", str(m1), str(m2), "--weights", "0.5", "0.6", "--out", str(tmp_path / "p")]) == 2
    assert "--allow-unnormalized" in capsys.readouterr().err


def test_output_that_is_a_file_is_refused_before_reading(two_models, tmp_path):
    m1, m2 = two_models
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(BunnyError, match="afile is a file; an output folder cannot"):
        average_models([m1, m2], [0.5, 0.5], tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "mine"
