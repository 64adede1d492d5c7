"""bfloat16 is refused on CPUs without native bf16 arithmetic, allowed on GPUs and on CPUs that have it."""
import pytest

from bunny.errors import BunnyError
from bunny.model import dtypes
from bunny.model.dtypes import bf16_refusal, check_dtype, cpu_flags

AVX2 = frozenset("fpu sse sse2 avx avx2 fma f16c".split())
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}
SAPPHIRE = AVX512 | {"avx512_bf16", "amx_bf16", "amx_tile"}
ZEN4 = AVX512 | {"avx512_bf16"}
NEOVERSE_V1 = frozenset("fp asimd sve bf16 i8mm".split())


def test_rule_on_fake_flag_sets():
    assert "lacks native bf16" in bf16_refusal("cpu", AVX2, "AVX2")
    assert "AVX512" in bf16_refusal("cpu", AVX512, "AVX512")  # AVX-512 without its bf16 extension
    assert bf16_refusal("cpu", SAPPHIRE, "AVX512") is None
    assert bf16_refusal("cpu", ZEN4, "AVX512") is None
    assert bf16_refusal("cpu", NEOVERSE_V1, "SVE256") is None
    assert "no /proc/cpuinfo" in bf16_refusal("cpu", None, "DEFAULT")
    for device in ("cuda", "cuda:1"):
        assert bf16_refusal(device, AVX2, "AVX2") is None


def test_cpu_flags_parsing():
    x86 = ("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: spectre\n\n"
           "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}


def test_check_dtype_on_this_machine(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: AVX2)
    with pytest.raises(BunnyError, match="bfloat16 on this CPU is refused.*torch's CPU capability"):
        check_dtype("bfloat16", "cpu")
    check_dtype("bfloat16", "cuda")
    check_dtype("float32", "cpu")
    check_dtype(None, "cpu")
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: SAPPHIRE)
    check_dtype("bfloat16", "cpu")


def test_serve_and_chat_refuse_before_loading(monkeypatch, capsys):
    """The refusal comes before the model is fetched (this model name does not exist)."""
    from bunny.cli import main

    monkeypatch.setattr(dtypes, "cpu_flags", lambda: AVX2)
    for argv in (["serve", "--model", "no/such-model", "--dtype", "bfloat16"],
                 ["chat", "--model", "no/such-model", "--dtype", "bfloat16", "--prompt", "hi"]):
        assert main(argv) == 2
        assert "bfloat16 on this CPU is refused" in capsys.readouterr().err
