"""How the benchmark names a system run: `eager`, or a variant with options, `eager[attn=eager]` (bench/systems.py
builds it, the report orders and colours it by its system)."""

from __future__ import annotations

import re

# Every system of the benchmark (bench/systems.py), in the order the runner runs and the report lists them; the
# default of `--systems`.
SYSTEMS = ["pockengine", "pockengine-onnx", "eager", "torch.compile", "ort", "executorch", "peft-lora"]
_VARIANT = re.compile(r"(?P<base>[\w.-]+)(?:\[(?P<options>[^\]]*)\])?")


def parse_system(spec: str) -> tuple[str, dict[str, str]]:
    """`eager[attn=eager]` -> ("eager", {"attn": "eager"}); a plain name has no options."""
    match = _VARIANT.fullmatch(spec.strip())
    pairs = [p.split("=") for p in match["options"].split(",")] if match and match["options"] else []
    if match is None or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ValueError(f"system {spec!r}: write a system as name or name[option=value,...], e.g. eager[attn=eager]")
    return match["base"], {k.strip(): v.strip() for k, v in pairs}


def base_system(spec: str) -> str:
    """The system a run name is a variant of (itself for a plain name)."""
    return parse_system(spec)[0]
