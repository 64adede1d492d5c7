import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from bunny.cli import main
from bunny.convert.export_gguf import export_gguf
from bunny.errors import BunnyError
from bunny.model.loading import load_pretrained, save_pretrained
from bunny.testing import make_tiny_bunny, save_tiny_bunny


def _interleave(w, n_head):
    """llama.cpp's rotary layout, by hand: row i of a head's first half goes to 2i, of its second half to 2i+1."""
    d = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def _fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader):
    return {t.name: (np.asarray(t.data), t.tensor_type.name) for t in reader.tensors}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    src = save_tiny_bunny(root / "m", seed=4)
    llm, mmproj = export_gguf(src, root / "gguf", outtype="f32")
    model, processor = load_pretrained(src)
    return model, processor, GGUFReader(str(llm)), GGUFReader(str(mmproj))


def test_llm_metadata_and_tokenizer(exported):
    model, processor, llm, _ = exported
    f = _fields(llm)
    cfg = model.config.text_config
    assert f["general.architecture"] == "llama"
    expected = {"llama.block_count": 2, "llama.embedding_length": 32, "llama.feed_forward_length": 64,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8,
                "llama.context_length": 512, "llama.vocab_size": cfg.vocab_size, "general.file_type": 0,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",  # GPT-2's byte-level regex
                "tokenizer.ggml.bos_token_id": processor.tokenizer.bos_token_id,
                "tokenizer.ggml.eos_token_id": processor.tokenizer.eos_token_id}
    assert {k: f[k] for k in expected} == expected
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    vocab = processor.tokenizer.get_vocab()
    assert f["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    merges = json.loads(processor.tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert f["tokenizer.ggml.token_type"][0] == 3 and f["tokenizer.ggml.token_type"][-1] == 1  # control, normal
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.padding_token_id"] == 3
    assert f["tokenizer.ggml.eot_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")  # bunny's sep2
    assert "tokenizer.chat_template" in f  # rendered by llama.cpp's Jinja in tests/convert/test_llamacpp.py


def test_every_llm_tensor(exported):
    model, _, llm, _ = exported
    state = model.language_model.state_dict()
    expected = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"],
                "output.weight": state["lm_head.weight"]}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for i in range(2):
        p = f"model.layers.{i}."
        for hf, ours in names.items():
            w = state[p + f"self_attn.{hf}.weight"]
            expected[f"blk.{i}.{ours}.weight"] = _interleave(w, 4 if hf == "q_proj" else 2) if hf in ("q_proj", "k_proj") else w
        for hf in ("gate_proj", "up_proj", "down_proj"):
            expected[f"blk.{i}.ffn_{hf.split('_')[0]}.weight"] = state[p + f"mlp.{hf}.weight"]
        expected[f"blk.{i}.attn_norm.weight"] = state[p + "input_layernorm.weight"]
        expected[f"blk.{i}.ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
    got = _tensors(llm)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(got[name][0], tensor.numpy(), err_msg=name)
        assert got[name][1] == "F32"


def test_every_mmproj_tensor_and_metadata(exported):
    model, processor, _, mmproj = exported
    f = _fields(mmproj)
    vc = model.config.vision_config
    expected_meta = {"general.architecture": "clip", "clip.has_vision_encoder": True, "clip.has_llava_projector": True,
                     "clip.projector_type": "mlp", "clip.vision.image_size": 28, "clip.vision.patch_size": 14,
                     "clip.vision.embedding_length": 24, "clip.vision.feed_forward_length": 48,
                     "clip.vision.projection_dim": 32, "clip.vision.attention.head_count": 4,
                     "clip.vision.block_count": 2,  # 3 layers, features from hidden_states[-2]
                     "clip.vision.feature_layer": [2],  # llama.cpp runs all 2 blocks, not block_count - 1
                     "clip.use_gelu": True}
    assert {k: f[k] for k in expected_meta} == expected_meta
    assert f["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(vc.layer_norm_eps)
    np.testing.assert_allclose(f["clip.vision.image_mean"], processor.image_processor.image_mean)
    np.testing.assert_allclose(f["clip.vision.image_std"], processor.image_processor.image_std)
    s = model.vision_tower.state_dict()
    expected = {"v.patch_embd.weight": s["embeddings.patch_embedding.weight"],
                "v.position_embd.weight": s["embeddings.position_embedding.weight"],
                "v.patch_embd.bias": s["embeddings.patch_embedding.bias"]}
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for i in range(2):  # the last block is not used by the features: not exported
        for hf, ours in block.items():
            for p in ("weight", "bias"):
                expected[f"v.blk.{i}.{ours}.{p}"] = s[f"encoder.layers.{i}.{hf}.{p}"]
    for j in (0, 2):
        for p in ("weight", "bias"):
            expected[f"mm.{j}.{p}"] = getattr(model.mm_projector[j], p)
    got = _tensors(mmproj)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(got[name][0], tensor.detach().numpy(), err_msg=name)


def test_f16_and_cli(tmp_path):
    src = save_tiny_bunny(tmp_path / "m")
    assert main(["export", "gguf", str(src), str(tmp_path / "g")]) == 0
    got = _tensors(GGUFReader(str(tmp_path / "g" / "model-f16.gguf")))
    assert got["blk.0.attn_q.weight"][1] == "F16" and got["output_norm.weight"][1] == "F32"
    mm = _tensors(GGUFReader(str(tmp_path / "g" / "mmproj-model-f16.gguf")))
    assert mm["v.patch_embd.weight"][1] == "F16" and mm["mm.0.bias"][1] == "F32"


def test_gguf_files_go_beside_what_the_folder_holds(tmp_path):
    """Exporting into the model's own folder (or one holding another outtype's export) adds the
    two files; the model and the other export stay, and the model still loads."""
    src = save_tiny_bunny(tmp_path / "m")
    before = sorted(p.name for p in src.iterdir())
    export_gguf(src, src, outtype="f32")
    export_gguf(src, src, outtype="f16")
    assert sorted(p.name for p in src.iterdir()) == sorted(
        before + ["model-f32.gguf", "mmproj-model-f32.gguf", "model-f16.gguf", "mmproj-model-f16.gguf"])
    load_pretrained(src)
    assert _tensors(GGUFReader(str(src / "model-f32.gguf")))["blk.0.attn_q.weight"][1] == "F32"


def test_output_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    for kind in ("gguf", "llava-hf"):
        assert main(["export", kind, str(tmp_path / "no-model-here"), str(tmp_path / "afile")]) != 0
        assert "afile is a file; an output folder cannot" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("kwargs, message", [
    (dict(s2_scales=[28, 56]), "S2 multi-scale"),
    (dict(image_token_pool=2), "image_token_pool 2"),
    (dict(projector_type="linear"), "projector 'linear'"),
    (dict(tower="clip"), "a CLIP tower .*shifted by one patch"),
    (dict(family="stablelm", text_overrides=dict(qk_layernorm=True)), "stablelm with qk_layernorm=True"),
    (dict(text_overrides=dict(hidden_act="gelu")), "llama.cpp's llama uses silu, this llama uses 'gelu'"),
])
def test_what_llamacpp_cannot_express_is_refused_before_writing(tmp_path, kwargs, message):
    src = _tiny_with(tmp_path / "m", **kwargs)
    with pytest.raises(BunnyError, match=message):
        export_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_llm_family_names_the_family_and_the_alternative():
    from transformers import AutoConfig

    from bunny.convert.gguf_llm import check_llm_exportable

    with pytest.raises(BunnyError, match="LLM family 'gemma' is not supported .*convert_hf_to_gguf.py"):
        check_llm_exportable(AutoConfig.for_model("gemma"))


def test_a_tokenizer_llamacpp_cannot_split_alike_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    model, processor = make_tiny_bunny()
    processor.tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    save_pretrained(model, processor, tmp_path / "m")
    with pytest.raises(BunnyError, match="no pre-tokenizer known to match it"):
        export_gguf(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _tiny_with(folder, text_overrides=None, family="llama", tower="siglip", **kwargs):
    """A tiny bunny whose LLM config carries overrides (weights built for them)."""
    from bunny.model.config import BunnyConfig
    from bunny.model.modeling import BunnyForConditionalGeneration
    from bunny.model.processor import BunnyProcessor
    from bunny.testing import tiny_image_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config

    tokenizer = tiny_tokenizer()
    text = tiny_text_config(family, len(tokenizer), bos_token_id=1, eos_token_id=2, **(text_overrides or {}))
    config = BunnyConfig(vision_config=tiny_vision_config(tower), text_config=text, **kwargs)
    torch.manual_seed(0)
    model = BunnyForConditionalGeneration(config).eval()
    return save_pretrained(model, BunnyProcessor.from_config(config, tokenizer, tiny_image_processor(tower)), folder)
