import torch

from bunny.train.parts import match_projector_norm, projector_reference
from bunny.testing import make_tiny_bunny, random_image


def test_projected_features_get_the_embedding_norm():
    model, processor = make_tiny_bunny()
    samples = [{"pixel_values": processor(text="<image>", images=[random_image(i)])["pixel_values"]} for i in range(3)]
    with torch.no_grad():
        before = model.get_image_features(torch.cat([s["pixel_values"] for s in samples])).norm(dim=-1).mean()
    scale = match_projector_norm(model, projector_reference(model, samples + [{"pixel_values": None}]))
    with torch.no_grad():
        after = model.get_image_features(torch.cat([s["pixel_values"] for s in samples])).norm(dim=-1).mean()
    target = model.get_input_embeddings().weight.detach().norm(dim=-1).mean()
    torch.testing.assert_close(after, target, rtol=1e-4, atol=1e-6)
    assert abs(scale - float(target / before)) < 1e-4 * abs(scale)
