"""transformers' own Auto classes open a bunny checkpoint (no trust_remote_code): AutoConfig,
AutoProcessor and AutoModel / AutoModelForCausalLM / AutoModelForImageTextToText give the
same inputs, logits and generations as bunny.load_pretrained."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoProcessor, ProcessorMixin)

from bunny.errors import BunnyError
from bunny.model.config import BunnyConfig
from bunny.model.loading import load_pretrained
from bunny.model.modeling import BunnyForConditionalGeneration
from bunny.model.processor import BunnyProcessor
from bunny.testing import random_image, save_tiny_bunny, tiny_llm

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
AUTO_MODELS = [AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText]


def _inputs(processor):
    texts = [processor.apply_chat_template(MESSAGES), processor.apply_chat_template(MESSAGES + [
        {"role": "assistant", "content": "A circle."}, {"role": "user", "content": "Colour?"}])]
    return processor(text=texts, images=[[random_image(1)], [random_image(2, size=(30, 50))]], padding_side="left")


@pytest.mark.parametrize("spec", [dict(family="llama", tower="siglip"),
                                  dict(family="qwen2", tower="clip", bos=True, template="phi3")])
def test_auto_classes_match_load_pretrained(tmp_path, spec):
    folder = save_tiny_bunny(tmp_path / "ckpt", **spec)
    ours, our_processor = load_pretrained(folder)

    assert isinstance(AutoConfig.from_pretrained(folder), BunnyConfig)
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, BunnyProcessor) and isinstance(processor, ProcessorMixin)
    assert processor.to_dict() == our_processor.to_dict()
    assert type(processor.image_processor) is type(our_processor.image_processor)  # the PIL backend
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]
    inputs, expected_inputs = _inputs(processor), _inputs(our_processor)
    assert inputs.keys() == expected_inputs.keys()
    for key in inputs:
        assert torch.equal(inputs[key], expected_inputs[key]), key

    with torch.no_grad():
        expected = ours(**expected_inputs).logits
        expected_ids = ours.generate(**expected_inputs, max_new_tokens=5, do_sample=False)
    for auto in AUTO_MODELS:
        model = auto.from_pretrained(folder)
        assert type(model) is BunnyForConditionalGeneration and not model.training, auto.__name__
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
            assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), expected_ids)


def test_auto_classes_open_a_hub_id_offline(tmp_path, hub_cache):
    folder = save_tiny_bunny(tmp_path / "ckpt")
    hub_cache.publish("someone/tiny-bunny", folder)
    processor = AutoProcessor.from_pretrained("someone/tiny-bunny")
    model = AutoModelForImageTextToText.from_pretrained("someone/tiny-bunny")
    ours, our_processor = load_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(processor)).logits, ours(**_inputs(our_processor)).logits,
                                   rtol=0, atol=0)


def test_saved_files_are_those_bunny_always_wrote(tmp_path):
    """Checkpoints saved before BunnyProcessor was a ProcessorMixin have exactly these files,
    so they open through AutoProcessor too; the settings file is unchanged."""
    folder = save_tiny_bunny(tmp_path / "ckpt", template="phi3")
    assert sorted(p.name for p in folder.iterdir()) == [
        "bunny_processor.json", "config.json", "generation_config.json", "model.safetensors",
        "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((folder / "bunny_processor.json").read_text()) == {
        "image_seq_length": 4, "image_token_index": 400, "template": "phi3", "image_mode": "pad",
        "model_max_length": 2048, "padding_side": "right"}
    assert "processor_class" not in json.loads((folder / "tokenizer_config.json").read_text())


def test_settings_override_and_bad_options(tmp_path):
    folder = save_tiny_bunny(tmp_path / "ckpt")
    assert AutoProcessor.from_pretrained(folder, template="plain").template == "plain"
    with pytest.raises(BunnyError, match="unsupported option.*cache_dir.*valid settings: image_seq_length"):
        BunnyProcessor.from_pretrained(folder, cache_dir=str(tmp_path))
    with pytest.raises(BunnyError, match="unsupported option.*push_to_hub"):
        BunnyProcessor.from_pretrained(folder).save_pretrained(tmp_path / "out", push_to_hub=True)
    llm, tokenizer = tiny_llm()
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    with pytest.raises(BunnyError, match="holds no bunny_processor.json; is it a bunny checkpoint"):
        BunnyProcessor.from_pretrained(tmp_path / "llm")
    with pytest.raises(BunnyError, match="neither a local folder nor a hub id"):
        BunnyProcessor.from_pretrained(str(tmp_path / "missing" / "x" / "y"))


def test_code_shipped_in_a_checkpoint_never_runs(tmp_path):
    """A checkpoint that names remote code (auto_map) and ships it: even with
    trust_remote_code=True the registered bunny classes open it and the code never runs."""
    folder = save_tiny_bunny(tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")
    auto_map = {"AutoConfig": "evil.Evil", "AutoProcessor": "evil.Evil", "AutoModelForImageTextToText": "evil.Evil"}
    config = json.loads((folder / "config.json").read_text()) | {"auto_map": auto_map}
    (folder / "config.json").write_text(json.dumps(config))
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(processor) is BunnyProcessor and type(model) is BunnyForConditionalGeneration
    assert not marker.exists()


def test_importing_bunny_model_code_registers_the_auto_classes(tmp_path):
    """In a fresh interpreter, importing bunny.model.modeling (as bunny.load_pretrained does)
    is all transformers needs; before it, AutoConfig does not know model_type 'bunny'."""
    folder = save_tiny_bunny(tmp_path / "ckpt")
    script = (
        "import sys\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor\n"
        "try:\n"
        "    AutoConfig.from_pretrained(sys.argv[1])\n"
        "    raise SystemExit('bunny was known before import')\n"
        "except ValueError:\n"
        "    pass\n"
        "import bunny.model.modeling\n"
        "p = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "m = AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
        "print(type(p).__name__, type(m).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["BunnyProcessor", "BunnyForConditionalGeneration"]
