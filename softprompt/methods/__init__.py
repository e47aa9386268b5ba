"""Training methods as small variants of one interface (`base.Method`): what is trained and how it
enters the model. `softprompt train --method NAME` trains any of them; `softprompt compare` runs
them side by side."""

from __future__ import annotations

from .base import Method, MethodError
from .few_shot import FewShot
from .full import FullFineTuning
from .linear_probe import LinearProbe
from .lora import LoRA
from .p_tuning import PTuning
from .prefix import PrefixTuning
from .prompt_tuning import PromptTuning
from .residual import Residual
from .zero_shot import Calibrated, ZeroShot

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (ZeroShot, Calibrated, FewShot, PromptTuning, Residual, PTuning, PrefixTuning, LoRA, FullFineTuning, LinearProbe)
}
DEFAULT_METHOD = PromptTuning.name


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "MethodError", "method_class"]
