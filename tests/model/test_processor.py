"""Templates render the reference's exact text; the processor tokenises like the reference."""
import pytest
import torch

from bunny.errors import BunnyError
from bunny.model.templates import DEFAULT_SYSTEM, get_template
from bunny.testing import make_tiny_bunny, random_image

Q = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]


@pytest.mark.parametrize("name,sep2", [("bunny", "<|endoftext|>"), ("phi3", "<|endoftext|>"),
                                       ("minicpm", "</s>"), ("llama", "<|end_of_text|>")])
def test_two_style_templates(name, sep2):
    _, processor = make_tiny_bunny()
    text = processor.apply_chat_template(Q, template=name)
    assert text == f"{DEFAULT_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"
    multi = Q + [{"role": "assistant", "content": "A dog."}, {"role": "user", "content": "Colour?"}]
    assert processor.apply_chat_template(multi, template=name) == (
        f"{DEFAULT_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A dog.{sep2}USER: Colour? ASSISTANT:"
    )


def test_bunny_template_without_system_prompt():
    """Our short variant: the reference's rendering of an empty system prompt, same answers trained."""
    _, processor = make_tiny_bunny()
    assert processor.apply_chat_template(Q, template="bunny-nosystem") == " USER: <image>\nWhat is this? ASSISTANT:"
    tpl = get_template("bunny-nosystem")
    turns = [("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    text = tpl.render(turns)
    assert text == " USER: <image>\nQ1 ASSISTANT: A1<|endoftext|>USER: Q2 ASSISTANT: A2<|endoftext|>"
    assert [text[a:b] for a, b in tpl.answer_spans(turns)] == ["A1<|endoftext|>", "A2<|endoftext|>"]
    assert text == get_template("bunny").render(turns, system="")


def test_plain_template_inference_and_training():
    _, processor = make_tiny_bunny()
    assert processor.apply_chat_template(Q, template="plain") == "<image>\nWhat is this?\n"
    plain = get_template("plain")
    assert plain.render([("user", "<image>\nDescribe."), ("assistant", "a red circle")]) == "<image>a red circle\n"
    with pytest.raises(BunnyError, match="single turn"):
        plain.render([("user", "a"), ("assistant", "b"), ("user", "c")])


def test_system_message_and_plain_string_content():
    _, processor = make_tiny_bunny()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(msgs) == "Be brief. USER: Hi ASSISTANT:"


def test_answer_spans_cover_answers_and_sep2():
    tpl = get_template("bunny")
    turns = [("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    text = tpl.render(turns)
    assert [text[a:b] for a, b in tpl.answer_spans(turns)] == ["A1<|endoftext|>", "A2<|endoftext|>"]


@pytest.mark.parametrize("bos", [False, True])
def test_reference_tokenisation(bos):
    _, processor = make_tiny_bunny(bos=bos)
    tok = processor.tokenizer
    text = "USER: <image>\nWhat is this? ASSISTANT:"
    # The reference tokenises the text around <image> piece by piece, keeping one BOS.
    before, after = (tok(c).input_ids for c in text.split("<image>"))
    if bos:
        expected = [tok.bos_token_id] + before[1:] + [-200] + after[1:]
        assert before[0] == tok.bos_token_id
    else:
        expected = before + [-200] + after
    assert processor.reference_input_ids(text) == expected
    ids = processor.tokenize(text)
    n = processor.image_seq_length
    assert ids.count(processor.image_token_index) == n
    collapsed = [t for i, t in enumerate(ids) if t != processor.image_token_index or ids[i - 1] != t]
    assert [(-200 if t == processor.image_token_index else t) for t in collapsed] == expected


def test_pad_mode_uses_mean_colour_canvas():
    _, processor = make_tiny_bunny()
    wide = random_image(0, size=(40, 20))
    pixels = processor(text="<image>", images=[wide])["pixel_values"]
    # SigLIP mean 0.5 -> fill (127,127,127) -> normalised (127/255-0.5)/0.5 on the top rows.
    top = pixels[0, :, 0, :]
    torch.testing.assert_close(top, torch.full_like(top, (127 / 255 - 0.5) / 0.5), atol=1e-4, rtol=0)


def test_image_count_mismatch_errors():
    model, processor = make_tiny_bunny()
    with pytest.raises(BunnyError, match="1 <image> placeholders .* but 2 images"):
        processor(text="<image> hi", images=[random_image(0), random_image(1)])
    with pytest.raises(BunnyError, match="2 <image> placeholders"):
        processor(text="<image><image>", images=[random_image(0)])
    inputs = processor(text="<image> hi", images=[random_image(0)])
    with pytest.raises(BunnyError, match="no images were given"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(BunnyError, match="2 images were given"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))


def test_missing_and_corrupt_image_files(tmp_path):
    _, processor = make_tiny_bunny()
    with pytest.raises(BunnyError, match="image file not found: .*nope.png"):
        processor(text="<image>", images=[str(tmp_path / "nope.png")])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(BunnyError, match="cannot read image file .*bad.png"):
        processor(text="<image>", images=[str(bad)])


def test_prompt_longer_than_limit():
    _, processor = make_tiny_bunny()
    long_text = "hello " * 100
    with pytest.raises(BunnyError, match="longer than the limit of 50"):
        processor(text=long_text, max_length=50)
    assert processor(text=long_text, max_length=50, truncation=True)["input_ids"].shape[1] == 50


def test_unknown_names_list_valid_ones():
    with pytest.raises(BunnyError, match="choose one of bunny, bunny-nosystem, llama"):
        make_tiny_bunny(template="vicuna")
    with pytest.raises(BunnyError, match="unknown projector 'mlp_relu'.*mlpNx_gelu"):
        make_tiny_bunny(projector_type="mlp_relu")
    from bunny.model.towers import TOWER_PRESETS

    with pytest.raises(BunnyError, match="valid names: clip-vit-large-patch14-336"):
        TOWER_PRESETS.get("siglip")
    with pytest.raises(BunnyError, match="roles must alternate"):
        make_tiny_bunny()[1].apply_chat_template([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("projector", ["linear", "mlp3x_gelu", "mlp1x_gelu"])
def test_projector_variants(projector):
    model, processor = make_tiny_bunny(projector_type=projector)
    inputs = processor(text="<image> hi", images=[random_image(0)])
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
