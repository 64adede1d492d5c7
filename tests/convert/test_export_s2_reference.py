"""A reference S2 checkpoint (`use_s2`, mm_hidden_size = 3 x tower width) loads with the
reference's S2 outputs, re-implemented here the plain way: every crop through the tower on
its own, placed into a grid by hand, area-pooled as block means."""
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from bunny.convert.reference import load_reference
from bunny.model.modeling import BunnyForConditionalGeneration
from bunny.testing import make_tiny_bunny, random_image

from reference_builders import llm_state, make_llm, projector_state, reference_config, save_tower, write_json
from reference_forward import reference_s2

SCALES = [28, 56, 84]  # the reference's 384, 768, 1152 for a 28-pixel tower


def test_reference_s2_checkpoint_gives_reference_outputs(tmp_path):
    tower_dir, tower = save_tower(tmp_path)
    llm, tokenizer = make_llm("llama", seed=8)
    folder = tmp_path / "bunny-s2"
    folder.mkdir()
    write_json(folder / "config.json", reference_config(llm, "llama", tower_dir, use_s2=True,
                                                        s2_scales=",".join(map(str, SCALES)), mm_hidden_size=72))
    tokenizer.save_pretrained(folder)
    proj = projector_state(9, mm_hidden=72)
    save_file(llm_state(llm) | {"model.mm_projector." + k: v for k, v in proj.items()},
              str(folder / "model.safetensors"))
    model, processor = load_reference(folder)
    assert model.config.s2_scales == SCALES and model.config.mm_hidden_size == 72
    pixels = processor.image_processor(random_image(3), return_tensors="pt")["pixel_values"]
    assert pixels.shape[-1] == 84  # images arrive at the largest scale
    with torch.no_grad():
        feats = reference_s2(tower, pixels, SCALES)  # (1, 4, 72)
        expected = F.linear(F.gelu(F.linear(feats, proj["0.weight"], proj["0.bias"])), proj["2.weight"], proj["2.bias"])
        torch.testing.assert_close(model.get_image_features(pixels), expected, rtol=1e-5, atol=1e-5)


def test_s2_model_from_parts_and_config_kwargs():
    model, processor = make_tiny_bunny(s2_scales=[28, 56])
    again = BunnyForConditionalGeneration.from_parts(model.vision_tower, model.language_model, s2_scales=[28, 56, 84])
    assert again.config.s2_scales == [28, 56, 84] and again.mm_projector[0].in_features == 72
    assert processor.image_processor.size == {"height": 56, "width": 56}
