"""Weight-only int8 / int4 quantisation: golden values of the quantisers, round trips within
the quantisation step, a tiny model's greedy tokens, and every refusal."""
import pytest
import torch
from torch import nn

from bunny.errors import BunnyError
from bunny.model.generation import SamplingSettings, generate_ids
from bunny.serve.quantize import (Int4WeightOnlyLinear, Int8WeightOnlyLinear, QuantizedEmbedding, describe,
                                  quantize_model, weight_bytes)
from bunny.testing import make_tiny_bunny, random_image


def _linear(out_f: int, in_f: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight[0, 3] = 5.0  # an outlier: its row's step is large, the other rows' are not
    return layer


def test_int8_golden_values():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]]))
    q = Int8WeightOnlyLinear.from_linear(layer)
    assert q.qweight.dtype == torch.int8
    assert q.qweight.tolist() == [[64, -127, 32], [0, 0, 0]]  # 63.5 rounds to even; a zero row stays zero
    torch.testing.assert_close(q.scale, torch.tensor([1 / 127, 1.0]))


def test_int4_golden_values():
    layer = nn.Linear(32, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_((torch.arange(32) % 16).float()[None] * 0.1 - 0.4)
    q = Int4WeightOnlyLinear.from_linear(layer, group_size=32)
    assert q.packed.shape == (1, 16) and q.packed.dtype == torch.uint8
    assert q.packed[0, :3].tolist() == [0 | 1 << 4, 2 | 3 << 4, 4 | 5 << 4]  # low nibble first
    torch.testing.assert_close(q.scale, torch.tensor([[0.1]]))
    torch.testing.assert_close(q.minimum, torch.tensor([[-0.4]]))
    torch.testing.assert_close(q.dequantize(), layer.weight.detach(), atol=1e-6, rtol=0)


def test_int8_round_trip_within_half_a_step():
    layer = _linear(48, 40)
    q = Int8WeightOnlyLinear.from_linear(layer)
    err = (q.dequantize() - layer.weight.detach()).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-7).all()
    assert q.scale[0] > 10 * q.scale[1:].max()  # the outlier costs only its own row
    x = torch.randn(5, 40)
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), layer.bias), atol=1e-5, rtol=1e-5)
    bound = x.abs().sum(-1, keepdim=True) * q.scale / 2  # each weight off by at most half its row's step
    assert ((q(x) - layer(x)).abs() <= bound + 1e-5).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("cls, slack", [(Int8WeightOnlyLinear, 1e-7), (Int4WeightOnlyLinear, 1e-6)])
def test_groups_round_trip_within_half_a_step(cls, slack, group_size):
    layer = _linear(8, 256, seed=group_size)
    q = cls.from_linear(layer, group_size)
    assert q.scale.shape == (8, 256 // group_size)
    err = (q.dequantize() - layer.weight.detach()).abs().reshape(8, -1, group_size)
    assert (err <= q.scale[..., None] / 2 + slack).all()
    # The outlier's group has a large step; the rest of its row keeps a fine one.
    assert q.scale[0, 0] > 10 * q.scale[0, 1:].max()
    x = torch.randn(3, 256)
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), layer.bias), atol=1e-5, rtol=1e-5)


def _prompts(processor):
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": q}]}])
             for q in ("What?", "Which colour is it?", "How many are there?", "Where is it?")]
    return processor(text=texts, images=[[random_image(i)] for i in range(len(texts))], padding_side="left")


@pytest.mark.parametrize("mode,group_size,min_same,max_logit_diff",
                         [("int8", None, 0.98, 0.01), ("int8", 32, 0.98, 0.01), ("int4", 32, 0.9, 0.1)])
def test_tiny_model_greedy_tokens_mostly_equal(mode, group_size, min_same, max_logit_diff):
    model, processor = make_tiny_bunny(seed=6)
    reference, _ = make_tiny_bunny(seed=6)
    projector_before = [p.clone() for p in model.mm_projector.parameters()]
    quantize_model(model, mode, group_size=group_size)
    kind = Int8WeightOnlyLinear if mode == "int8" else Int4WeightOnlyLinear
    lm = model.language_model
    assert not [m for m in lm.modules() if type(m) is nn.Linear]  # the head included
    head = lm.get_output_embeddings()
    assert isinstance(head, Int8WeightOnlyLinear) and head.group_size is None  # int8 per row in every mode
    assert sum(isinstance(m, kind) and m is not head for m in lm.modules()) == 7 * lm.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(projector_before, model.mm_projector.parameters()))
    assert weight_bytes(lm) < weight_bytes(reference.language_model)

    # The greedy choice at every position of four image prompts (a random tiny model's logits are
    # nearly tied, so a free-running comparison would mostly measure where the first tie breaks).
    inputs = _prompts(processor)
    with torch.inference_mode():
        want, got = reference(**inputs).logits, model(**inputs).logits
    real = inputs["attention_mask"].bool()
    same = (want.argmax(-1) == got.argmax(-1))[real].float().mean().item()
    assert same >= min_same, (mode, same)
    assert (want - got).abs().max() <= max_logit_diff * want.abs().max()
    assert generate_ids(model, inputs, SamplingSettings(max_new_tokens=4), [])  # decoding runs with the cache


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int8", 32), ("int4", 32)])
def test_tied_embeddings_become_a_lookup_into_the_quantised_head(mode, group_size):
    model, _ = make_tiny_bunny(seed=2)
    lm = model.language_model
    lm.lm_head.weight = lm.get_input_embeddings().weight  # tied, as in SmolLM2 or Qwen2-0.5B
    table = lm.get_input_embeddings().weight.detach().clone()
    before = weight_bytes(lm)
    quantize_model(model, mode, group_size=group_size)
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and embedding.head is head
    ids = torch.tensor([[0, 5, 399], [7, 7, 1]])
    rows = embedding(ids)
    assert rows.shape == (2, 3, 32) and rows.dtype == torch.float32
    torch.testing.assert_close(rows, head.dequantize()[ids], atol=0, rtol=0)
    assert head.group_size is None  # int8, one scale per row, in every mode
    assert ((rows - table[ids]).abs() <= head.scale[ids][..., None] / 2 + 1e-7).all()  # within half a step
    # One table: the embedding adds no bytes of its own.
    assert weight_bytes(lm) == weight_bytes(nn.ModuleList(m for m in lm.modules() if m is not embedding
                                                          and not list(m.children())))
    assert weight_bytes(lm) < before / 3


def test_untied_embeddings_stay_float():
    model, _ = make_tiny_bunny(seed=3)
    lm = model.language_model
    assert lm.get_input_embeddings().weight is not lm.get_output_embeddings().weight
    embedding = lm.get_input_embeddings()
    quantize_model(model, "int8")
    assert lm.get_input_embeddings() is embedding and embedding.weight.dtype == torch.float32
    assert isinstance(lm.get_output_embeddings(), Int8WeightOnlyLinear)


def test_bf16_activations_stay_bf16():
    model, processor = make_tiny_bunny(seed=1)
    quantize_model(model, "int8")
    model.to(torch.bfloat16)
    layer = next(m for m in model.language_model.modules() if isinstance(m, Int8WeightOnlyLinear))
    assert layer.qweight.dtype == torch.int8  # .to(dtype) leaves the integer weights alone
    assert layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_int4_refuses_a_layer_whose_inputs_do_not_divide_the_group():
    model, _ = make_tiny_bunny()  # hidden size 32: q_proj has 32 inputs
    before = [type(m) for m in model.modules()]
    with pytest.raises(BunnyError, match=r"group size 64: layer 'language_model\.model\.layers\.0\.self_attn\.q_proj' "
                                         r"has 32 inputs"):
        quantize_model(model, "int4", group_size=64)
    assert [type(m) for m in model.modules()] == before  # nothing replaced


def test_bad_modes_and_group_sizes_are_refused():
    model, _ = make_tiny_bunny()
    with pytest.raises(BunnyError, match="unknown quantisation 'int3'; choose one of int8, int4, 8bit, 4bit"):
        quantize_model(model, "int3")
    with pytest.raises(BunnyError, match="group size 48 is not supported; choose one of 32, 64, 128"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(BunnyError, match="group size applies to --quantize int8 and int4 only, not 8bit"):
        quantize_model(model, "8bit", "cpu", group_size=32)
    with pytest.raises(BunnyError, match="int8 with group size 64: layer 'language_model.model.layers.0"):
        quantize_model(model, "int8", group_size=64)


def test_describe_names_every_quantisation_once():
    assert describe("int4", None) == describe("int4", 64) == "int4/g64"  # int4's default group spelled out
    assert describe("int8", None) == "int8" and describe("int8", 32) == "int8/g32"
    assert describe("4bit", None) == "4bit" and describe(None, None) is None


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_bitsandbytes_modes_need_a_gpu(mode):
    model, _ = make_tiny_bunny()
    with pytest.raises(BunnyError, match="needs a CUDA GPU|needs bitsandbytes"):
        quantize_model(model, mode, "cpu")


def test_compiled_decode_of_a_quantised_model_gives_its_plain_tokens():
    """--quantize with --compile: the int8 layers, int8 head and the lookup into it compile into the
    static-cache step, with the plain path's greedy tokens."""
    model, processor = make_tiny_bunny(seed=8)
    lm = model.language_model
    lm.lm_head.weight = lm.get_input_embeddings().weight  # tied: the step's embedding is the lookup
    quantize_model(model, "int8")
    assert isinstance(lm.get_input_embeddings(), QuantizedEmbedding)
    inputs = _prompts(processor)
    plain = generate_ids(model, inputs, SamplingSettings(max_new_tokens=6), [])
    assert generate_ids(model, inputs, SamplingSettings(max_new_tokens=6, compile=True), []) == plain


def test_cli_spells_out_every_mode_and_group_size():
    """bunny.serve.cli lists the modes and group sizes itself (building the parser imports no torch):
    every one that quantize_model takes parses, and another is refused by the parser."""
    import argparse

    from bunny.serve.cli import add_quantize_arguments
    from bunny.serve.quantize import GROUP_SIZES, MODES

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_quantize_arguments(parser)
    for mode in MODES:
        for size in GROUP_SIZES:
            args = parser.parse_args(["--quantize", mode, "--group-size", str(size)])
            assert (args.quantize, args.group_size) == (mode, size)
    for bad in (["--quantize", "int3"], ["--group-size", "48"]):
        with pytest.raises(argparse.ArgumentError):
            parser.parse_args(bad)
