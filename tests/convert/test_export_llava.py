"""`bunny export llava-hf`, proven in transformers' own code: LlavaForConditionalGeneration's
logits, LlavaProcessor's ids, pixels and chat template, and pipeline("image-text-to-text")
answering as bunny's `generate` does."""
import copy

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

from bunny.cli import main
from bunny.convert.export_llava import chat_template, export_llava_hf, generation_config
from bunny.errors import BunnyError
from bunny.model.generation import SamplingSettings, generate
from bunny.model.images import preprocess_images
from bunny.model.loading import load_pretrained
from bunny.testing import make_tiny_bunny, random_image, save_tiny_bunny

QUESTIONS = ["What is in the image?", "Is it red?", "How many squares are there?", "What color is the circle?"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _user(question, image=None, n_images=1):
    parts = [{"type": "image", **({"image": image} if image is not None else {})} for _ in range(n_images)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("tower, bos", [("siglip", False), ("clip", True)])
def test_llava_loads_with_the_same_ids_pixels_and_logits(tmp_path, tower, bos):
    src = save_tiny_bunny(tmp_path / "m", tower=tower, seed=5, bos=bos)
    out = export_llava_hf(src, tmp_path / "llava")
    model, processor = load_pretrained(src)
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    llava_processor = AutoProcessor.from_pretrained(out, backend="pil")
    image = random_image(1, size=(40, 23))  # not square: the export pads as bunny's `pad` mode does
    prompt = processor.apply_chat_template(_user("What is in the image?"))
    assert llava_processor.apply_chat_template(_user("What is in the image?"), add_generation_prompt=True) == prompt
    ours = processor(text=prompt, images=[image])
    theirs = llava_processor(text=prompt, images=[image], return_tensors="pt")
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    assert (ours["input_ids"][0, 0] == processor.tokenizer.bos_token_id) == bos
    assert int((theirs["input_ids"] == model.config.image_token_index).sum()) == model.config.image_seq_length
    assert torch.equal(theirs["pixel_values"], ours["pixel_values"])
    # The default (torchvision) backend resizes with its own bicubic: within one grey level.
    default = AutoProcessor.from_pretrained(out)(text=prompt, images=[image], return_tensors="pt")
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    levels = (default["pixel_values"] - ours["pixel_values"]).abs() * std * 255
    assert float(levels.max()) <= 1 + 1e-4
    vocab = model.config.text_config.vocab_size
    with torch.no_grad():
        expected = model(**ours).logits
        got = llava(**theirs).logits
    torch.testing.assert_close(got[..., :vocab], expected, rtol=1e-5, atol=1e-5)


def test_pipeline_answers_equal_bunny_generate(tmp_path):
    src = save_tiny_bunny(tmp_path / "m", tower="siglip", seed=3)
    out = export_llava_hf(src, tmp_path / "llava")
    model, processor = load_pretrained(src)
    pipe = pipeline("image-text-to-text", model=str(out), device="cpu")
    settings = SamplingSettings(max_new_tokens=10)
    images = [random_image(i, size=(18 + 6 * i, 28)) for i in range(4)] + [random_image(9, size=(70, 45))]
    for i, image in enumerate(images):
        question = QUESTIONS[i % len(QUESTIONS)]
        ours = generate(model, processor, [processor.apply_chat_template(_user(question))], [[image]], settings)[0]
        theirs = pipe(text=_user(question, image), max_new_tokens=10, return_full_text=False)[0]["generated_text"]
        assert theirs.strip() == ours, (i, question)  # bunny strips answers, as the reference does
    two = processor.apply_chat_template(_user("Compare them.", n_images=2))
    ours = generate(model, processor, [two], [[images[0], images[4]]], settings)[0]
    parts = [{"type": "image", "image": images[0]}, {"type": "image", "image": images[4]},
             {"type": "text", "text": "Compare them."}]
    message = [{"role": "user", "content": parts}]
    assert pipe(text=message, max_new_tokens=10, return_full_text=False)[0]["generated_text"].strip() == ours


@pytest.mark.parametrize("template", ["bunny", "bunny-nosystem", "llama", "plain", "native"])
def test_chat_template_renders_bunny_prompts(tmp_path, template):
    from transformers import LlavaProcessor

    model, processor = make_tiny_bunny(template=template)
    processor.tokenizer.chat_template = CHATML
    jinja = chat_template(template, processor.tokenizer)
    llava_processor = LlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                     patch_size=14, image_token="<image>", chat_template=jinja)
    conversations = [_user("What is it?"), _user("Compare {these}.", n_images=2), _user("Say hi."),
                     [{"role": "user", "content": "A string question?"}]]
    if template != "plain":  # plain renders a single user turn
        conversations += [
            [{"role": "system", "content": "Be brief."}] + _user("What is it?"),
            _user("What is it?") + [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}],
            _user("Q?") + [{"role": "assistant", "content": [{"type": "text", "text": "A."}]}],
        ]
    for messages in conversations:
        for prompt in (True, False):
            expected = processor.apply_chat_template(messages, add_generation_prompt=prompt)
            got = llava_processor.apply_chat_template(messages, add_generation_prompt=prompt)
            assert got == expected, (template, messages, prompt)


def test_bad_conversations_fail_in_the_exported_template(tmp_path):
    from transformers import LlavaProcessor

    _, processor = make_tiny_bunny()
    llava_processor = LlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                     patch_size=14, image_token="<image>",
                                     chat_template=chat_template("bunny", processor.tokenizer))
    with pytest.raises(Exception, match="roles must alternate"):
        llava_processor.apply_chat_template([{"role": "assistant", "content": "Hi."}])
    with pytest.raises(Exception, match="content parts must be of type image or text"):
        llava_processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_generation_config_stops_where_bunny_stops_and_never_emits_the_image_token(tmp_path):
    out = export_llava_hf(save_tiny_bunny(tmp_path / "m", template="llama"), tmp_path / "llava")
    model, processor = load_pretrained(tmp_path / "m")
    llava = LlavaForConditionalGeneration.from_pretrained(out)
    config = llava.generation_config
    assert sorted(config.eos_token_id) == processor.stop_token_ids()
    assert processor.tokenizer.convert_tokens_to_ids("<|end_of_text|>") in config.eos_token_id
    assert config.do_sample is False and config.suppress_tokens == [model.config.image_token_index]
    # Give the image token's head row (zero in the export) the best logit at the first step:
    # greedy decoding would pick it; the exported config suppresses it.
    inputs = AutoProcessor.from_pretrained(out)(text="Hi", return_tensors="pt")
    image_id, n = model.config.image_token_index, inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = llava(**inputs).logits[0, -1]
        top = int(logits.argmax())
        llava.lm_head.weight[image_id] = llava.lm_head.weight[top] * (2.0 if logits[top] > 0 else 0.5)
    assert int(llava.generate(**inputs, max_new_tokens=1, suppress_tokens=None)[0, n]) == image_id
    assert image_id not in llava.generate(**inputs, max_new_tokens=3)[0, n:].tolist()


def test_refusals_name_the_reason(tmp_path, capsys, monkeypatch):
    s2 = save_tiny_bunny(tmp_path / "s2", s2_scales=[28, 56])
    with pytest.raises(BunnyError, match="cannot export to llava-hf: S2 multi-scale"):
        export_llava_hf(s2, tmp_path / "o")
    assert main(["export", "llava-hf", str(s2), str(tmp_path / "o")]) == 2
    assert "S2" in capsys.readouterr().err and not (tmp_path / "o").exists()
    native = save_tiny_bunny(tmp_path / "native", template="native")
    with pytest.raises(BunnyError, match="'native' but its tokenizer has no"):
        export_llava_hf(native, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    model, processor = make_tiny_bunny()
    monkeypatch.setattr(type(processor), "stop_strings", property(lambda self: ["END OF ANSWER"]))
    with pytest.raises(BunnyError, match="stop string 'END OF ANSWER' is not one token"):
        generation_config(model, processor)


def test_image_processor_that_llava_cannot_reproduce_is_refused(tmp_path):
    from bunny.convert.export_llava import check_same_pixels, llava_image_processor

    _, processor = make_tiny_bunny()
    llava_ip = llava_image_processor(processor.image_processor, "pad")
    check_same_pixels(llava_ip, processor.image_processor, "pad")
    other = copy.deepcopy(processor.image_processor)
    other.image_mean = [0.4, 0.5, 0.5]  # bunny pads with this mean colour, the Llava copy with its own
    with pytest.raises(BunnyError, match="does not reproduce the tower's .* in mode 'pad'"):
        check_same_pixels(llava_ip, other, "pad")
    assert torch.equal(preprocess_images([random_image(2, (28, 28))], processor.image_processor, "square"),
                       llava_image_processor(processor.image_processor, "square")(
                           images=[random_image(2, (28, 28))], return_tensors="pt")["pixel_values"])


@pytest.mark.slow
def test_demo_sized_model_answers_the_same_through_the_pipeline(tmp_path):
    """SmolLM2-135M + the shipped tower with the demo's word-grounded projector: answers that
    depend on the image, equal through transformers' pipeline (non-square images: padded)."""
    from bunny.data.synthetic import draw_example
    from bunny.data.synthetic_render import render_scene
    from bunny.model.loading import DEFAULT_TOWER, build_model, save_pretrained
    from bunny.train.demo_ground import fit_word_projector

    torch.set_num_threads(2)
    model, processor = build_model("smollm2-135m", tower=DEFAULT_TOWER, template="bunny-nosystem")
    fit_word_projector(model, processor.tokenizer, seed=0, n_images=128)
    save_pretrained(model, processor, tmp_path / "demo")
    out = export_llava_hf(tmp_path / "demo", tmp_path / "llava")
    pipe = pipeline("image-text-to-text", model=str(out), device="cpu")
    settings = SamplingSettings(max_new_tokens=8)
    fixed = "What color is the circle?"
    asked, by_image = 0, []
    for i in range(3):
        scene, qas = draw_example(7, "eval", i)
        image = render_scene(scene).crop((0, 6, 64, 58))  # 64x52: padded to 64x64, as bunny pads
        for question in (fixed, qas[0]["question"]):
            prompt = processor.apply_chat_template(_user(question))
            ours = generate(model, processor, [prompt], [[image]], settings)[0]
            theirs = pipe(text=_user(question, image), max_new_tokens=8, return_full_text=False)[0]["generated_text"]
            assert theirs.strip() == ours, (i, question)
            asked += 1
            if question == fixed:
                by_image.append(ours)
    assert asked == 6 and len(set(by_image)) > 1, by_image  # the image changes the answer


def test_export_never_deletes_the_model_or_other_files(tmp_path):
    src = save_tiny_bunny(tmp_path / "m", tower="siglip", seed=3)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(BunnyError, match="is the model being exported"):
        export_llava_hf(src, src)
    assert sorted(p.name for p in src.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(BunnyError, match=r"already holds notes\.txt"):
        export_llava_hf(src, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
