import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from bunny.cli import main
from bunny.convert.export_llava import export_llava_hf
from bunny.errors import BunnyError
from bunny.model.loading import load_pretrained
from bunny.testing import random_image, save_tiny_bunny


@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_llava_loads_with_the_same_logits(tmp_path, tower):
    src = save_tiny_bunny(tmp_path / "m", tower=tower, seed=5)
    out = export_llava_hf(src, tmp_path / "llava")
    model, processor = load_pretrained(src)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    llava_processor = LlavaProcessor.from_pretrained(out)
    image = random_image(1, size=(28, 28))  # square: bunny's pad step is a no-op
    ours = processor(text="<image>\nWhat is in the image?", images=[image])
    theirs = llava_processor(text="<image>\nWhat is in the image?", images=[image], return_tensors="pt")
    n_image = int((theirs["input_ids"] == model.config.image_token_index).sum())
    assert n_image == model.config.image_seq_length
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"])
    vocab = model.config.text_config.vocab_size
    with torch.no_grad():
        expected = model(**ours).logits
        got = llava(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"],
                    attention_mask=ours["attention_mask"]).logits[..., :vocab]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_s2_refused_with_reason(tmp_path, capsys):
    s2 = save_tiny_bunny(tmp_path / "s2", s2_scales=[28, 56])
    with pytest.raises(BunnyError, match="cannot export to llava-hf: S2 multi-scale"):
        export_llava_hf(s2, tmp_path / "o")
    assert main(["export", "llava-hf", str(s2), str(tmp_path / "o")]) == 2
    assert "S2" in capsys.readouterr().err and not (tmp_path / "o").exists()
