"""Small helpers shared by the tests: a toy sentiment task on the tiny model."""

import json

POSITIVE = ["a great film", "great film, lovely", "lovely and moving", "a moving film", "great and lovely"]
NEGATIVE = ["a dull mess", "boring mess", "dull, boring", "a boring film", "a dull film, boring"]


def write_task(folder, model_dir, steps=8, extra=""):
    rows = [{"text": t, "label": "positive"} for t in POSITIVE] + [
        {"text": t, "label": "negative"} for t in NEGATIVE
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / "task.yaml"
    task.write_text(
        f"model: {model_dir}\n"
        "template: '{soft:4} Review: {text} Sentiment: {label}'\n"
        "verbalizer: {positive: [code], negative: [Sentiment]}\n"
        "data: {train: train.jsonl, dev: dev.jsonl}\n"
        "init: vocab\n"
        f"train: {{steps: {steps}, batch_size: 4, lr: 0.3, eval_every: 2, patience: 100{extra}}}\n"
    )
    return task


def quiet():
    from rich.console import Console

    return Console(file=open("/dev/null", "w"))


def transformers_greedy(generator, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate` for one row, the soft prompt spliced into inputs_embeds:
    the reference our cached, batched decoding must equal."""
    import torch

    ids = torch.tensor([ids])
    with torch.no_grad():
        return generator.backbone.model.generate(
            inputs_embeds=generator.lm.splice(ids),
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0].tolist()
