"""Prompt tuning on a GPU at a 1B-class shape: softprompt's training step against PEFT's, and model
FLOPs utilisation (issue 18, item 5). Prints one JSON object as its last line.

    python bench/gpu_prompt_mfu.py                       # cuda, Llama-3.2-1B's shape, batch 8 x 256 tokens
    python bench/gpu_prompt_mfu.py --shape tiny --device cpu --steps 2   # a smoke run anywhere

The model is randomly initialised (real weights cannot travel to the GPU machine): Llama 3.2 1B's
shape (16 layers, width 2048, 32 heads / 8 key-value heads, MLP 8192, vocabulary 128,256, tied
embeddings), saved once as a model folder that both sides load. Rows are the tests' byte-level
tokenizer's tokens, cut to `--length` per row, in the SST-2-like template
`{soft:20} Review: {text} Sentiment: {label}` with two one-token labels.

- **softprompt**: `prompt` (20 soft tokens, fp32) on the frozen bf16 body, the training step of
  `softprompt train` (task.loss, AdamW on the prompt).
- **softprompt, FSDP (1 process)** (`fsdp`): the body's decoder layers wrapped by torch's
  `fully_shard` (FSDP2) in a one-process group (the embeddings stay whole), and beside it the same
  without FSDP (`suffix`). Both put the soft tokens after the review
  (`Review: {text} {soft:20} Sentiment: {label}`): with them in front, softprompt runs the shared
  prefix through each layer once per step and the rows through it again, and FSDP, having resharded
  a layer after the rows' backward, finds its weights gone for the prefix's ("setStorage ... storage
  of size 0", measured on CPU with gloo). `softprompt train` refuses FSDP (softprompt/distributed.py);
  these rows measure what sharding the frozen body would cost on one GPU.
- **PEFT**: what a PEFT user writes: the model loaded in bf16, `PromptTuningConfig` (20 virtual
  tokens, random init), `get_peft_model`, the model's own causal-LM loss on the label token only,
  AdamW on the prompt.

Model FLOPs of one frozen-body training step, per token: the forward's matmuls (2 x the body's
non-embedding parameters, plus 4 x layers x width x tokens for attention) and as much again for the
backward's input gradients (no weight gradients: the body is frozen). The LM head is not counted (a
classification step needs its output at one position). MFU = that count x tokens/s / the GPU's
dense bf16 peak (`--peak-tflops`, else looked up by the device's name).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import _save, _tokenizer  # noqa: E402  (the tests' byte-level tokenizer)

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L4": 121.0}  # dense bf16
SOFT = 20
WORDS = "the a film movie story actor plot scene good bad slow fast great awful funny dull warm cold".split()


def build(folder: Path, shape: str) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_theta=500000.0, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return _save(folder, LlamaForCausalLM(config).to(torch.bfloat16), _tokenizer())


def write_rows(folder: Path, tokenizer, rows: int, length: int) -> None:
    """`rows` reviews of exactly `length` tokens each (before the template), labels alternating."""
    rng = random.Random(0)
    lines = []
    for i in range(rows):
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(length)), add_special_tokens=False)[:length]
        lines.append(json.dumps({"text": tokenizer.decode(ids), "label": ("negative", "positive")[i % 2]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "dev.jsonl").write_text("\n".join(lines[:16]) + "\n")


def write_task(folder: Path, length: int, name: str, template: str) -> Path:
    task = folder / f"task-{name}.yaml"
    task.write_text(
        f"model: {folder / 'model'}\n"
        f"template: '{template}'\n"
        "verbalizer: {negative: [negative], positive: [positive]}\n"
        "data: {train: train.jsonl, dev: dev.jsonl}\n"
        "init: random\n"
        f"train: {{steps: 100, batch_size: 8, max_length: {length + 64}, activation_memory: 1000000}}\n"
    )
    return task


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, device: torch.device, steps: int, warmup: int = 3) -> tuple[float, list[float]]:
    """Seconds of `steps` calls of `step` (after `warmup` untimed ones) and every call's loss."""
    losses, seconds = [], 0.0
    for i in range(warmup + steps):
        sync(device)
        began = time.perf_counter()
        losses.append(step())
        sync(device)
        seconds += (time.perf_counter() - began) if i >= warmup else 0.0
    return seconds, losses


def softprompt_side(task_file: Path, device: str, batch: int, steps: int, fsdp: bool) -> dict:
    from softprompt.backbone import Backbone
    from softprompt.methods import method_class
    from softprompt.taskfile import load_task
    from softprompt.train import _task_for

    spec = load_task(task_file)
    backbone = Backbone.load(spec.model, device=device)
    if fsdp:
        _shard(backbone.model)
    kind = method_class("prompt")
    task, _ = _task_for(spec, kind, backbone)
    method = kind.build(task, backbone)
    task.use_method(method)
    params = list(method.trainable().values())
    optimizer = torch.optim.AdamW(params, lr=0.03)
    rows = list(range(batch))

    def step() -> float:
        optimizer.zero_grad()
        loss = task.loss(rows)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    seconds, losses = timed_steps(step, backbone.device, steps)
    train = task.rows["train"]
    return {"seconds": seconds, "losses": losses, "trained_dtype": str(params[0].dtype),
            "body_dtype": str(backbone.dtype), "tokens_per_row": float(train.lengths[:batch].mean()) + len(train.prefix)}


def _shard(model: torch.nn.Module) -> None:
    """FSDP2 over a one-process group, each decoder layer a unit. The embeddings and the head stay
    plain tensors: softprompt calls the embedding table outside the model's forward (the splice),
    where a root-level shard would not be gathered."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    for layer in model.model.layers:
        fully_shard(layer)


def peft_side(model_dir: Path, folder: Path, device: str, batch: int, steps: int) -> dict:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=SOFT,
                                                     prompt_tuning_init=PromptTuningInit.RANDOM))
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()[:batch]]
    encoded = tokenizer([f"Review: {r['text']} Sentiment: {r['label']}" for r in rows], return_tensors="pt", padding=True)
    labels = torch.full_like(encoded.input_ids, -100)
    last = encoded.attention_mask.sum(1) - 1  # right padding: the label is each row's last token
    labels[torch.arange(len(rows)), last] = encoded.input_ids[torch.arange(len(rows)), last]
    inputs = {k: v.to(device) for k, v in encoded.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.03)

    def step() -> float:
        optimizer.zero_grad()
        loss = model(**inputs, labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    seconds, losses = timed_steps(step, torch.device(device), steps)
    trained = [p for p in model.parameters() if p.requires_grad]
    return {"seconds": seconds, "losses": losses, "trained_dtype": str(trained[0].dtype),
            "tokens_per_row": float(encoded.attention_mask.sum()) / len(rows) + SOFT}


def step_flops_per_token(config: LlamaConfig, context: float) -> float:
    """Frozen-body training FLOPs per token: forward matmuls and attention, and as much again backward."""
    width, layers = config.hidden_size, config.num_hidden_layers
    kv = width // config.num_attention_heads * config.num_key_value_heads
    per_layer = width * width * 2 + width * kv * 2 + 3 * width * config.intermediate_size  # q, o; k, v; gate, up, down
    forward = 2 * layers * per_layer + 4 * layers * width * context
    return 2 * forward


def peak_tflops(device: str, given: float | None) -> float | None:
    if given or device != "cuda":
        return given
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def summarize(side: dict, batch: int, steps: int, flops_token: float, peak: float | None) -> dict:
    examples_s = batch * steps / side["seconds"]
    tokens_s = examples_s * side["tokens_per_row"]
    out = {"examples_per_s": round(examples_s, 2), "tokens_per_row": round(side["tokens_per_row"], 1),
           "first_loss": round(side["losses"][0], 4), "last_loss": round(side["losses"][-1], 4),
           "trained_dtype": side["trained_dtype"], "achieved_tflops": round(tokens_s * flops_token / 1e12, 2)}
    if peak:
        out["mfu"] = round(tokens_s * flops_token / (peak * 1e12), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256, help="review tokens per row (before the template)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--sides", default="softprompt,peft,suffix,fsdp")
    args = parser.parse_args()
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder / "model", args.shape)
        from transformers import AutoTokenizer

        write_rows(folder, AutoTokenizer.from_pretrained(folder / "model"), 4 * args.batch, args.length)
        templates = {"front": f"{{soft:{SOFT}}} Review: {{text}} Sentiment: {{label}}",
                     "after": f"Review: {{text}} {{soft:{SOFT}}} Sentiment: {{label}}"}
        tasks = {k: write_task(folder, args.length, k, t) for k, t in templates.items()}
        config = LlamaConfig.from_pretrained(folder / "model")
        results, raw = {}, {}
        for side in sides:
            began = time.perf_counter()
            if side == "peft":
                raw[side] = peft_side(folder / "model", folder, args.device, args.batch, args.steps)
            else:
                task_file = tasks["front" if side == "softprompt" else "after"]
                raw[side] = softprompt_side(task_file, args.device, args.batch, args.steps, fsdp=side == "fsdp")
            flops = step_flops_per_token(config, raw[side]["tokens_per_row"])
            results[side] = summarize(raw[side], args.batch, args.steps, flops, peak_tflops(args.device, args.peak_tflops))
            results[side]["wall_s"] = round(time.perf_counter() - began, 1)
            if args.device == "cuda":
                results[side]["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
            print(json.dumps({side: results[side]}), flush=True)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "shape": args.shape, "batch": args.batch, "length": args.length, "steps": args.steps,
              "peak_tflops": peak_tflops(args.device, args.peak_tflops), **results}
    if "softprompt" in results and "peft" in results:
        report["softprompt_over_peft"] = round(results["softprompt"]["examples_per_s"] / results["peft"]["examples_per_s"], 2)
    if "fsdp" in results and "suffix" in results:
        report["fsdp_over_plain"] = round(results["fsdp"]["examples_per_s"] / results["suffix"]["examples_per_s"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
