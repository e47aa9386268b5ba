"""The CUDA path of every training method, on a randomly initialised model of the default model's
shape (SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 key-value heads, vocabulary 49,152; real
weights cannot travel to a GPU machine here). On CUDA the frozen body runs in bf16 while what a
method trains stays fp32 (prompts, encoders, prefixes, LoRA adapters); full fine-tuning trains the
bf16 weights themselves. Checks that every method's loss is finite and falls on a fixed batch, that
its trained tensors keep their dtype, and measures train and eval examples/s. Prints one JSON line.

    python bench/cuda_methods.py [--device cuda] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from softprompt.backbone import Backbone  # noqa: E402
from softprompt.methods import METHODS, method_class  # noqa: E402
from softprompt.taskfile import load_task  # noqa: E402
from softprompt.train import _task_for  # noqa: E402

from conftest import _save, _tokenizer  # noqa: E402  (the tests' byte-level tokenizer)
from helpers import write_task  # noqa: E402

SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
    rope_theta=100000.0, pad_token_id=0, eos_token_id=1, bos_token_id=None,
)


def build(folder: Path, layers: int) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_SHAPE, "num_hidden_layers": layers})
    return _save(folder, LlamaForCausalLM(config), _tokenizer())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, model_dir: Path, folder: Path, device: str, steps: int) -> dict:
    backbone = Backbone.load(str(model_dir), device=device)  # fresh: lora and full change it
    spec = load_task(write_task(folder, model_dir))
    task, _ = _task_for(spec, method_class(name), backbone)
    method = method_class(name).build(task, backbone)
    task.use_method(method)
    params = list(method.trainable().values())
    dtypes = sorted({str(p.dtype) for p in params})
    optimizer = torch.optim.AdamW(params, lr=method.lr)
    batch = list(range(8))
    losses, seconds = [], 0.0
    for step in range(steps + 3):  # three warm-up steps, not timed
        sync(backbone.device)
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = task.loss(batch)
        loss.backward()
        optimizer.step()
        sync(backbone.device)
        if step >= 3:
            seconds += time.perf_counter() - started
        losses.append(float(loss.detach()))
    rows = task.rows["dev"]
    task.model.predict_proba(rows)  # warm-up
    sync(backbone.device)
    started = time.perf_counter()
    for _ in range(5):
        task.model.predict_proba(rows)
    sync(backbone.device)
    eval_s = time.perf_counter() - started
    return {
        "method": name,
        "body_dtype": str(backbone.dtype),
        "trained_dtypes": dtypes,
        "trainable": sum(p.numel() for p in params),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        "loss_fell": losses[-1] < losses[0],
        "train_examples_per_s": round(8 * steps / seconds, 1),
        "eval_examples_per_s": round(5 * len(rows) / eval_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=30, help="fewer for a quick smoke run")
    parser.add_argument("--methods", default=",".join(n for n, m in METHODS.items() if m.trains))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(Path(tmp) / "model", args.layers)
        results = []
        for name in args.methods.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            results.append(measure(name, model_dir, folder, args.device, args.steps))
            print(json.dumps(results[-1]), flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "methods": results}))


if __name__ == "__main__":
    main()
