"""Small helpers shared by the tests: a toy sentiment task on the tiny model."""

import json

POSITIVE = ["a great film", "great film, lovely", "lovely and moving", "a moving film", "great and lovely"]
NEGATIVE = ["a dull mess", "boring mess", "dull, boring", "a boring film", "a dull film, boring"]


def write_task(folder, model_dir, steps=8, extra="", batch_size=4, eval_every=2, data_extra=""):
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
        f"data: {{train: train.jsonl, dev: dev.jsonl{data_extra}}}\n"
        "init: vocab\n"
        f"train: {{steps: {steps}, batch_size: {batch_size}, lr: 0.3, eval_every: {eval_every}, patience: 100{extra}}}\n"
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


def reference_label_scores(clf, encoded, row: int, mean: bool = False):
    """[L] label scores of one row from plain full-sequence forwards, no cache: each choice's word
    (+ what follows the slot) run after the row's prompt, its log-probabilities summed (the word's
    own averaged when `mean`), then the verbalizer's label formula. What the cached, batched scoring must equal."""
    import torch

    backbone = clf.backbone
    context = encoded.prefix + encoded.bodies[row]
    scores = []
    with torch.no_grad():
        for word in clf.choices.ids:
            tokens = word + encoded.afters[row]
            hidden = backbone.body(inputs_embeds=clf.lm.splice(torch.tensor([context + tokens]))).last_hidden_state
            logp = torch.log_softmax(backbone.logits(hidden[0]), -1)
            each = [logp[len(context) - 1 + j, t] for j, t in enumerate(tokens)]
            in_word, after = sum(each[: len(word)]), sum(each[len(word) :])
            scores.append((in_word / len(word) if mean else in_word) + after)
    return clf.choices.label_scores(torch.stack(scores).unsqueeze(0))[0]


def write_run(folder, backbone, template: str, verbalizer=None, seed: int = 0, max_length: int = 128, generation=None):
    """A run folder as `train` leaves it (task.json + prompt.safetensors), with a seeded vocab-init
    prompt instead of a trained one: for tests of what uses runs (serving), not of training."""
    from softprompt.run import RunInfo
    from softprompt.soft_prompt import init_prompt
    from softprompt.template import Template

    kind = "generation" if "{target}" in template else "classification"
    parsed = Template.parse(template, slot="target" if kind == "generation" else "label")
    folder.mkdir(parents=True, exist_ok=True)
    init_prompt("vocab", parsed.soft_tokens, backbone, seed=seed).save(folder)
    RunInfo(
        kind=kind,
        model=backbone.spec,
        fingerprint=backbone.fingerprint,
        template=template,
        verbalizer=verbalizer,
        generation=(generation or {"max_new_tokens": 8}) if kind == "generation" else None,
        soft_tokens=parsed.soft_tokens,
        max_length=max_length,
        init="vocab",
    ).write(folder)
    return folder


def train_stopped_and_resumed(spec, run, backbone_for, stop_at: int, **kwargs):
    """Train into `run`, interrupted (Ctrl-C) after step `stop_at`, then resumed to the end.
    `backbone_for()` gives the model of each start (a fresh one where the method changes it)."""
    import pytest

    from softprompt.train import train

    def stop(step):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, run, backbone=backbone_for(), console=quiet(), on_step=stop, **kwargs)
    return train(spec, run, backbone=backbone_for(), console=quiet(), resume=True, **kwargs)
