"""Bad reference checkpoints fail with a BunnyError naming the file or key at fault."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import bunny
from bunny.convert.reference import load_reference
from bunny.convert.reference_config import read_reference, text_config_from
from bunny.errors import BunnyError

from reference_builders import build_lora, build_merged, build_stage1


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text()) | changes
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key)
    path.write_text(json.dumps(config))


def test_missing_llm_key_is_listed(root):
    truth = build_merged(root, "llama")
    shard = truth.folder / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    dropped = sorted(k for k in state if k.startswith("model.layers."))[0]
    del state[dropped]
    save_file(state, str(shard))
    with pytest.raises(BunnyError, match=rf"missing keys: .*{dropped}"):
        load_reference(truth.folder)


def test_unexpected_projector_key_is_listed(root):
    truth = build_stage1(root, "llama")
    path = truth.folder / "mm_projector.bin"
    state = torch.load(path, weights_only=True) | {"model.mm_projector.4.weight": torch.zeros(2, 2)}
    torch.save(state, path)
    with pytest.raises(BunnyError, match=r"unexpected keys: 4\.weight"):
        load_reference(truth.folder)


def test_missing_projector_in_lora_is_listed(root):
    truth = build_lora(root, "llama")
    path = truth.folder / "non_lora_trainables.bin"
    state = {k: v for k, v in torch.load(path, weights_only=True).items() if not k.endswith("2.bias")}
    torch.save(state, path)
    with pytest.raises(BunnyError, match=r"projector weights .*missing keys: 2\.bias"):
        load_reference(truth.folder, model_base=str(truth.base))


def test_unfrozen_tower_without_tower_weights(root):
    truth = build_lora(root, "llama")
    _edit_config(truth.folder, unfreeze_vision_tower=True)
    with pytest.raises(BunnyError, match="unfreeze_vision_tower"):
        load_reference(truth.folder, model_base=str(truth.base))


def test_lora_without_model_base(root):
    truth = build_lora(root, "llama")
    _edit_config(truth.folder, _name_or_path=None)
    with pytest.raises(BunnyError, match="model_base"):
        bunny.load_pretrained(truth.folder)


def test_base_that_is_not_a_local_folder(root):
    truth = build_stage1(root, "llama")
    _edit_config(truth.folder, _name_or_path="someone/not-downloaded")
    with pytest.raises(BunnyError, match="not-downloaded.*not in the hub cache.*pass model_base"):
        load_reference(truth.folder)


def test_minicpm_is_refused_with_the_reason(root):
    truth = build_merged(root, "llama")
    _edit_config(truth.folder, model_type="bunny-minicpm")
    with pytest.raises(BunnyError, match="MiniCPM.*no implementation in transformers.*trust_remote_code"):
        load_reference(truth.folder)


def test_unknown_model_type_lists_known_ones(root):
    truth = build_merged(root, "llama")
    _edit_config(truth.folder, model_type="bunny-gemma")
    with pytest.raises(BunnyError, match="bunny-gemma.*bunny-llama"):
        read_reference(truth.folder)


def test_folder_without_weights(root):
    truth = build_stage1(root, "llama")
    (truth.folder / "mm_projector.bin").unlink()
    with pytest.raises(BunnyError, match="matches no reference layout"):
        load_reference(truth.folder)


def test_bin_files_are_never_unpickled_beyond_tensors(root):
    truth = build_stage1(root, "llama")

    class Payload:  # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (print, ("owned",))

    with open(truth.folder / "mm_projector.bin", "wb") as f:
        pickle.dump({"model.mm_projector.0.weight": Payload()}, f)
    with pytest.raises(BunnyError, match="cannot read weight file .*mm_projector.bin"):
        load_reference(truth.folder)


def test_missing_tower_folder_names_the_key(root):
    truth = build_merged(root, "llama")
    _edit_config(truth.folder, mm_vision_tower=str(root / "no-such-tower"))
    with pytest.raises(BunnyError, match="no-such-tower.*mm_vision_tower"):
        load_reference(truth.folder)


def test_stablelm_epoch_config_names_are_mapped(tmp_path):
    config = {"model_type": "bunny-stablelm", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "rope_pct": 0.5,
              "norm_eps": 1e-6, "use_qkv_bias": True, "mm_vision_tower": "x", "auto_map": {"a": "b"}}
    text = text_config_from(config, tmp_path)
    assert text.model_type == "stablelm"
    assert text.layer_norm_eps == 1e-6 and text.use_qkv_bias
    assert text.rope_parameters["partial_rotary_factor"] == 0.5
    assert not hasattr(text, "mm_vision_tower") and not hasattr(text, "auto_map")
