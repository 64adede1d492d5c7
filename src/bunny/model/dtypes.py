"""Which weight dtypes a device runs well: bfloat16 on a CPU only with native bf16 arithmetic.

Without AVX512-BF16 or AMX (x86) or the bf16 extension (Arm), torch runs bfloat16 matrix
products by converting to float32 inside its kernels: the answers change (rounding) while the
speed does not pay for it, and on some kernels it is slower than float32. So `--dtype bfloat16`
on such a CPU is refused with the capability it lacks; on a GPU it is allowed.

The rule is a pure function of the CPU's flags (`bf16_refusal`), tested with fake flag sets;
`check_dtype` applies it to this machine (flags from /proc/cpuinfo, torch's vector capability
named in the message). Importing this module imports no torch (the CLI's parsers read DTYPES).
"""
from __future__ import annotations

from pathlib import Path

from bunny.errors import BunnyError

# The weight dtypes a model can be loaded in (`--dtype` of chat, serve and eval run).
DTYPES = ("float32", "bfloat16", "float16")
# /proc/cpuinfo flags (x86) and features (Arm) that mean native bf16 arithmetic.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The CPU's flags from /proc/cpuinfo text ('flags' on x86, 'Features' on Arm); None when
    there is no /proc/cpuinfo (not Linux): then nothing is known."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.is_file():
            return None
        cpuinfo = path.read_text(errors="replace")
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def bf16_refusal(device: str, flags: frozenset[str] | None, capability: str) -> str | None:
    """Why bfloat16 weights are refused on `device`, or None when they are allowed.
    flags: the CPU's /proc/cpuinfo flags (None: unknown); capability: torch's CPU vector level."""
    import torch

    if torch.device(device).type != "cpu":
        return None
    if flags is None:
        return (f"--dtype bfloat16 on the CPU needs native bf16 arithmetic (AVX512-BF16 or AMX on x86, bf16 on Arm), "
                f"and this system has no /proc/cpuinfo to tell (torch's CPU capability: {capability}); "
                "use float32")
    if any(f in flags for f in BF16_FLAGS):
        return None
    return (f"--dtype bfloat16 on this CPU is refused: it lacks native bf16 arithmetic (no avx512_bf16 or amx_bf16 "
            f"flag; torch's CPU capability: {capability}), so bf16 weights would change the answers without running "
            "faster; use float32 here, or bfloat16 on a GPU (--device cuda) or a CPU with AVX512-BF16 / AMX")


def check_dtype(dtype: str | torch.dtype | None, device: str) -> None:
    """Raise BunnyError when `dtype` should not run on `device` of this machine (see module doc)."""
    import torch

    if dtype is None:
        return
    if dtype not in ("bfloat16", torch.bfloat16):
        return
    reason = bf16_refusal(device, cpu_flags(), torch.backends.cpu.get_cpu_capability())
    if reason:
        raise BunnyError(reason)
