import io

import pytest

from bunny.cli import main
from bunny.errors import BunnyError
from bunny.model.generation import SamplingSettings
from bunny.serve.chat import ChatSession, run_chat
from bunny.testing import make_tiny_bunny, random_image, save_tiny_bunny


def test_one_shot_cli_prints_answer(tmp_path, capsys):
    folder = save_tiny_bunny(tmp_path / "ckpt")
    image = tmp_path / "img.png"
    random_image(0).save(image)
    assert main(["chat", "--model", str(folder), "--image", str(image), "--prompt", "What is it?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # the answer line (random weights: any text)


def test_one_shot_cli_quantised_answers_as_the_quantised_model(tmp_path, capsys):
    from bunny.model.generation import generate
    from bunny.model.loading import load_pretrained
    from bunny.serve.quantize import quantize_model

    folder = save_tiny_bunny(tmp_path / "ckpt")
    image = tmp_path / "img.png"
    random_image(0).save(image)
    assert main(["chat", "--model", str(folder), "--image", str(image), "--prompt", "What is it?",
                 "--max-new-tokens", "4", "--quantize", "int4", "--group-size", "32"]) == 0
    model, processor = load_pretrained(folder)
    quantize_model(model, "int4", group_size=32)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "What is it?"}]}])
    want = generate(model, processor, [prompt], [[random_image(0)]], SamplingSettings(max_new_tokens=4))[0]
    assert capsys.readouterr().out == want + "\n"
    assert main(["chat", "--model", str(folder), "--prompt", "hi", "--group-size", "32"]) == 2
    assert "--group-size 32 applies with --quantize int8 or int4" in capsys.readouterr().err


def test_cli_error_names_missing_image(tmp_path, capsys):
    folder = save_tiny_bunny(tmp_path / "ckpt")
    assert main(["chat", "--model", str(folder), "--image", str(tmp_path / "x.png"), "--prompt", "hi"]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_multi_turn_streaming_matches_non_streaming(tmp_path):
    model, processor = make_tiny_bunny(seed=4)
    image = tmp_path / "img.png"
    random_image(1).save(image)
    settings = SamplingSettings(max_new_tokens=6)
    a, b = ChatSession(model, processor, settings, str(image)), ChatSession(model, processor, settings, str(image))
    for q in ["What is it?", "And the colour?"]:
        streamed = []
        assert a.ask(q, on_text=streamed.append) == b.ask(q)
    assert len(a.messages) == 4 and a.messages[0]["content"][0] == {"type": "image"}
    assert a.messages[2]["content"] == [{"type": "text", "text": "And the colour?"}]


def test_interactive_commands(tmp_path):
    model, processor = make_tiny_bunny()
    image = tmp_path / "img.png"
    random_image(2).save(image)
    stdin = io.StringIO(f"hello\n/image {image}\nwhat?\n/image {tmp_path}/none.png\n/reset\n/exit\n")
    out = io.StringIO()
    assert run_chat(model, processor, SamplingSettings(max_new_tokens=3), stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    assert "(new image; conversation reset)" in text
    assert "error: image file not found" in text
    assert "(conversation reset)" in text


def test_untrained_projector_refuses_images(tmp_path):
    model, processor = make_tiny_bunny(projector_trained=False)
    image = tmp_path / "img.png"
    random_image(0).save(image)
    with pytest.raises(BunnyError, match="projector is untrained"):
        ChatSession(model, processor, SamplingSettings(), str(image))
