"""Models named by hub id: served from a hub cache in huggingface_hub's own layout with
HF_HUB_OFFLINE=1 (the autouse `hub_cache` fixture), equal to the same folder loaded by path;
only configs, tokenizers and weights are ever requested; bad ids fail naming the id."""
import fnmatch
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from bunny.errors import BunnyError
from bunny.model.hub import allow_patterns, local_or_hub
from bunny.model.loading import DEFAULT_TOWER, build_model, load_pretrained
from bunny.testing import random_image, save_tiny_bunny, tiny_llm

PROMPT_MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]

# The files of a published Bunny repo (trust_remote_code layout) and of its neighbours on the hub.
PUBLISHED_FILES = [
    ".gitattributes", "README.md", "images/example_1.png", "config.json", "generation_config.json",
    "configuration_bunny_phi3.py", "modeling_bunny_phi3.py", "model.safetensors.index.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "training_args.bin", "model-q4_k_m.gguf", "onnx/model.onnx",
    "flax_model.msgpack", "tf_model.h5", "vocab.json", "merges.txt", "qwen.tiktoken", "consolidated.safetensors",
]
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
NEEDED = {
    "config.json", "generation_config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt", "qwen.tiktoken",
}


def _logits(model, processor, seed: int = 3):
    text = processor.apply_chat_template(PROMPT_MESSAGES)
    with torch.no_grad():
        return model(**processor(text=text, images=[random_image(seed)])).logits


def _assert_same_model(a, b):
    (model_a, proc_a), (model_b, proc_b) = a, b
    torch.testing.assert_close(_logits(model_a, proc_a), _logits(model_b, proc_b), rtol=0, atol=0)


def test_allow_patterns_fetch_configs_tokenizers_and_the_indexed_shards():
    chosen = set(filter_repo_objects(PUBLISHED_FILES, allow_patterns=allow_patterns(PUBLISHED_FILES, SHARDS)))
    # No remote code, no pickled twin, no unindexed copy of the weights, no other formats.
    assert chosen == NEEDED


def test_allow_patterns_without_an_index_take_every_safetensors_file():
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "modeling_x.py", "model.gguf"]
    assert set(filter_repo_objects(files, allow_patterns=allow_patterns(files))) == {"config.json", "model.safetensors"}


def test_allow_patterns_take_bin_weights_when_the_repo_has_no_safetensors():
    files = ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
             "pytorch_model-00002-of-00002.bin", "modeling_x.py", "tokenizer.json", "training_args.bin"]
    chosen = set(filter_repo_objects(files, allow_patterns=allow_patterns(files)))
    assert chosen == {"config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                      "pytorch_model-00002-of-00002.bin", "tokenizer.json"}


def test_allow_patterns_of_reference_stage1_and_lora_folders():
    stage1 = ["config.json", "mm_projector.bin", "trainer_state.json", "training_args.bin"]
    assert set(filter_repo_objects(stage1, allow_patterns=allow_patterns(stage1))) == {
        "config.json", "mm_projector.bin", "trainer_state.json"}
    lora = ["config.json", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
            "non_lora_trainables.bin", "README.md"]
    assert set(filter_repo_objects(lora, allow_patterns=allow_patterns(lora))) == {
        "config.json", "adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"}


def test_unknown_listing_never_allows_code_or_other_formats():
    patterns = allow_patterns(None)
    for name in ("modeling_bunny_phi.py", "model.gguf", "model.onnx", "flax_model.msgpack", "tf_model.h5",
                 "training_args.bin", "optimizer.pt"):
        assert not any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_bunny_checkpoint_by_hub_id_equals_by_path(tmp_path, hub_cache, monkeypatch):
    folder = save_tiny_bunny(tmp_path / "ckpt", seed=5)
    (folder / "modeling_bunny.py").write_text("raise RuntimeError('remote code must never run')\n")
    hub_cache.publish("someone/tiny-bunny", folder)
    calls = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    by_id = load_pretrained("someone/tiny-bunny")
    _assert_same_model(by_id, load_pretrained(folder))
    assert calls and all(repo == "someone/tiny-bunny" for repo, _ in calls)
    for _, kwargs in calls:  # the cached .py file exists, but it is never asked for
        assert not any(fnmatch.fnmatch("modeling_bunny.py", p) for p in kwargs["allow_patterns"])


def test_revision_picks_the_snapshot_of_that_branch_or_commit(tmp_path, hub_cache):
    main = save_tiny_bunny(tmp_path / "main", seed=1)
    v2 = save_tiny_bunny(tmp_path / "v2", seed=2)
    hub_cache.publish("someone/tiny-bunny", main)
    commit = hub_cache.publish("someone/tiny-bunny", v2, revision="v2")
    logits_main = _logits(*load_pretrained("someone/tiny-bunny"))
    logits_v2 = _logits(*load_pretrained(v2))
    torch.testing.assert_close(logits_main, _logits(*load_pretrained(main)), rtol=0, atol=0)
    torch.testing.assert_close(_logits(*load_pretrained("someone/tiny-bunny", revision="v2")), logits_v2, rtol=0, atol=0)
    torch.testing.assert_close(_logits(*load_pretrained("someone/tiny-bunny", revision=commit)), logits_v2,
                               rtol=0, atol=0)
    assert not torch.equal(logits_main, logits_v2)


def test_plain_llm_and_tower_by_hub_id_equal_by_path(tmp_path, hub_cache):
    llm, tokenizer = tiny_llm("qwen2", seed=4)
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    hub_cache.publish("someone/tiny-llm", tmp_path / "llm")
    hub_cache.publish("someone/shapes-tower", DEFAULT_TOWER)
    torch.manual_seed(0)
    by_id = build_model(llm="someone/tiny-llm", tower="someone/shapes-tower")
    torch.manual_seed(0)  # the new projector is random: the same seed gives the same one
    by_path = build_model(llm=str(tmp_path / "llm"), tower=DEFAULT_TOWER)
    _assert_same_model(by_id, by_path)
    assert by_id[0].config.vision_tower == "someone/shapes-tower"  # recorded as given
    torch.manual_seed(0)
    composed = load_pretrained("someone/tiny-llm")  # a plain LLM composes with the shipped tower
    _assert_same_model(composed, by_path)


def test_an_existing_local_path_wins_over_the_hub_id(tmp_path, hub_cache, monkeypatch):
    hub_cache.publish("someone/tiny-bunny", save_tiny_bunny(tmp_path / "hub", seed=1))
    local = save_tiny_bunny(tmp_path / "cwd" / "someone" / "tiny-bunny", seed=2)
    monkeypatch.chdir(tmp_path / "cwd")
    assert local_or_hub("someone/tiny-bunny").resolve() == local.resolve()
    _assert_same_model(load_pretrained("someone/tiny-bunny"), load_pretrained(local))


def test_offline_and_not_cached_names_the_id_and_the_setting():
    with pytest.raises(BunnyError, match=r"model 'someone/not-cached' is not in the hub cache .*HF_HUB_OFFLINE=1"):
        load_pretrained("someone/not-cached")


def test_revision_not_in_the_cache_offline(tmp_path, hub_cache):
    hub_cache.publish("someone/tiny-bunny", save_tiny_bunny(tmp_path / "ckpt"))
    with pytest.raises(BunnyError, match=r"'someone/tiny-bunny' at revision 'no-such-branch' is not in the hub cache"):
        load_pretrained("someone/tiny-bunny", revision="no-such-branch")


def test_neither_a_path_nor_a_valid_id(tmp_path):
    for name in (str(tmp_path / "missing"), "a/b/c", "bad--name", "./nowhere"):
        with pytest.raises(BunnyError, match="neither a local folder nor a hub id"):
            load_pretrained(name)


def test_revision_of_a_local_folder_or_embedded_name_is_an_error(tmp_path):
    folder = save_tiny_bunny(tmp_path / "ckpt")
    with pytest.raises(BunnyError, match="is a local path; a revision .*'v2'.* applies only to hub ids"):
        load_pretrained(folder, revision="v2")
    with pytest.raises(BunnyError, match="'smollm2-135m' is an embedded LLM; a revision"):
        load_pretrained("smollm2-135m", revision="v2")


def test_snapshot_without_config_is_refused(tmp_path, hub_cache):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text("not a model\n")
    hub_cache.publish("someone/readme-only", tmp_path / "repo")
    with pytest.raises(BunnyError, match="'someone/readme-only'.*holds no config.json"):
        load_pretrained("someone/readme-only")


def test_chat_cli_answers_by_hub_id_offline(tmp_path, hub_cache):
    folder = save_tiny_bunny(tmp_path / "ckpt", seed=5)
    commit = hub_cache.publish("someone/tiny-bunny", folder)
    args = ["--prompt", "hello", "--max-new-tokens", "4"]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "bunny.cli", "chat", *extra, *args],  # noqa: E731
                                        capture_output=True, text=True, timeout=300)
    by_id, by_path = run("--model", "someone/tiny-bunny", "--revision", commit), run("--model", str(folder))
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_path.stdout and by_id.stdout.strip()
    missing = run("--model", "someone/not-cached")
    assert missing.returncode == 2 and "bunny: error: model 'someone/not-cached' is not in the hub cache" in missing.stderr


def test_serve_and_export_clis_fetch_the_revision_they_are_given(tmp_path, hub_cache, monkeypatch):
    import bunny.convert.export_llava
    import bunny.serve.server
    from bunny.cli import main

    commit = hub_cache.publish("someone/tiny-bunny", save_tiny_bunny(tmp_path / "v2"), revision="v2")
    snapshot = str(hub_cache.root / "models--someone--tiny-bunny" / "snapshots" / commit)
    seen = {}
    monkeypatch.setattr(bunny.serve.server, "serve", lambda model, **kw: seen.update(serve=(model, kw)))
    monkeypatch.setattr(bunny.convert.export_llava, "export_llava_hf", lambda model, out, **kw: seen.update(llava=model))
    assert main(["serve", "--model", "someone/tiny-bunny", "--revision", "v2"]) == 0
    assert seen["serve"][0] == snapshot and seen["serve"][1]["served_model_name"] == "tiny-bunny"
    assert main(["export", "llava-hf", "someone/tiny-bunny", str(tmp_path / "out"), "--revision", "v2"]) == 0
    assert seen["llava"] == snapshot
    seen.clear()
    assert main(["serve", "--model", "someone/tiny-bunny"]) == 2  # main is not cached: refused, nothing served
    assert seen == {}
