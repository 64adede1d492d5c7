"""The lmms-eval adapter with fake requests (lmms-eval itself is not installed)."""
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from bunny.eval import lmms_plugin
from bunny.eval.lmms_plugin import BunnyLmms
from bunny.model.generation import SamplingSettings, generate
from bunny.testing import make_tiny_bunny, random_image


@dataclass
class FakeRequest:  # lmms_eval.api.instance.Instance exposes the same `args`
    args: tuple


@pytest.fixture(scope="module")
def adapter():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, processor = make_tiny_bunny()
    docs = {i: {"image": random_image(i, (20 + 5 * i, 28))} for i in range(4)}
    bunny = BunnyLmms("tiny", batch_size=3, model=(model, processor))
    bunny.task_dict = {"toy": {"test": docs}}
    yield bunny
    torch.set_num_threads(threads)


def _visual(doc):
    return [doc["image"]]


def test_generate_until_batched_in_order_and_equal_to_single(adapter):
    questions = ["Is it red?", "How many squares are there in the picture on the left?", "What?", "Yes or no?"]
    kwargs = {"max_new_tokens": 5, "until": ["\n\n"], "temperature": 0}
    requests = [FakeRequest((q, dict(kwargs), _visual, i, "toy", "test")) for i, q in enumerate(questions)]
    batched = adapter.generate_until(requests)
    adapter.batch_size = 1
    try:
        single = adapter.generate_until(requests)
    finally:
        adapter.batch_size = 3
    assert batched == single and len(batched) == 4
    prompt = adapter.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[1]}]}])
    direct = generate(adapter.model, adapter.processor, [prompt], [[random_image(1, (25, 28))]],
                      SamplingSettings(max_new_tokens=5, stop_strings=["\n\n"]))
    assert batched[1] == direct[0]


def test_context_with_own_placeholder_and_text_only(adapter):
    with_tag = FakeRequest(("<image>\nIs it red?", {"max_new_tokens": 3}, _visual, 0, "toy", "test"))
    plain = FakeRequest(("Is it red?", {"max_new_tokens": 3}, _visual, 0, "toy", "test"))
    text_only = FakeRequest(("Say hi.", {"max_new_tokens": 3}, None, 0, "toy", "test"))
    a, b, c = adapter.generate_until([with_tag, plain, text_only])
    assert a == b and isinstance(c, str)


def test_loglikelihood_matches_the_model_loss(adapter):
    request = FakeRequest(("Is it red?", "yes it is", _visual, 2, "toy", "test"))
    ((logprob, greedy),) = adapter.loglikelihood([request])
    model, processor = adapter.model, adapter.processor
    prompt = adapter._prompt("Is it red?", 1)
    inputs = processor(text=[prompt], images=[random_image(2, (30, 28))])
    target = processor.tokenizer(" yes it is", add_special_tokens=False).input_ids
    ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
    labels = ids.clone()
    labels[:, : inputs["input_ids"].shape[1]] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, pixel_values=inputs["pixel_values"], labels=labels).loss
    torch.testing.assert_close(torch.tensor(logprob), -loss * len(target), rtol=1e-4, atol=1e-4)
    assert isinstance(greedy, bool) and logprob < 0


def test_lazy_lmms_class_and_manifest(monkeypatch):
    class lmms:  # the shape of lmms_eval.api.model.lmms that matters here
        def __init__(self):
            self._rank, self.task_dict, self.cache_hook = 0, {}, None

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None

    fakes = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
             "lmms_eval.api.model": types.SimpleNamespace(lmms=lmms),
             "lmms_eval.models": types.ModuleType("lmms_eval.models"),
             "lmms_eval.models.registry_v2": types.SimpleNamespace(ModelManifest=ModelManifest)}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(lmms_plugin.__dict__, "Bunny", raising=False)
    cls = lmms_plugin.Bunny
    assert issubclass(cls, lmms) and issubclass(cls, BunnyLmms) and cls.is_simple
    m = lmms_plugin.manifest()
    assert m.model_id == "bunny" and m.simple_class_path == "bunny.eval.lmms_plugin.Bunny"
    instance = cls("tiny", model=make_tiny_bunny())
    assert instance._rank == 0 and instance.task_dict == {}
    monkeypatch.delitem(lmms_plugin.__dict__, "Bunny")


def test_unknown_model_args_are_refused():
    from bunny.errors import BunnyError

    with pytest.raises(BunnyError, match="unknown model_args conv_template"):
        BunnyLmms("tiny", conv_template="x", model=(None, None))
