"""Batched greedy generation throughput: softprompt vs PEFT's `generate`, same prompt, rows, settings.

The softprompt side runs first: it loads SmolLM2-135M (the model these comparisons have always used), takes a soft prompt and template (a
trained run's, or a seeded `vocab` init with the summarization template below), encodes the first
`--rows` inputs of `--data`/dev.jsonl with the template, decodes them greedily in batches, and
writes the prompt as a PEFT adapter plus the exact input ids. The PEFT side then loads the same
model, attaches that adapter with `PeftModel.from_pretrained`, and calls `generate` on the same ids
(left-padded batches of the same size). A third side, `transformers`, calls the base model's
`generate` with the prompt vectors spliced before each row's embeddings: the computation PEFT's
`generate` should do. (With transformers 5 and peft 0.21, PEFT looks for the cache under its old
name `past_key_values`, finds none, and splices the 20 prompt vectors in again at every decoding
step: slower, and its tokens differ from a full-sequence reference after the first.) Each side runs
in its own subprocess. New tokens are counted up to and including the end marker. The last stdout
line is one JSON object: {"softprompt": {"new_tokens_per_s": ...}, "peft": {"new_tokens_per_s":
...}, ...}.

    python bench/generate_vs_peft.py --data ../shared/data/code_summarization --rows 48 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIDES = ("softprompt", "peft", "transformers")
TEMPLATE = "{soft:20} Summarize the function in one sentence.\nCode:\n{input}\nSummary: {target}"


def softprompt_side(args: argparse.Namespace, work: Path) -> dict:
    from softprompt import Backbone, SoftPrompt, Template, init_prompt
    from softprompt.data import load_examples
    from softprompt.generate import DecodeConfig, Generator
    from softprompt.peft_interop import write_adapter
    from softprompt.run import RunInfo

    backbone = Backbone.load("smollm2-135m")
    if args.run:
        template = Template.parse(RunInfo.read(args.run).template, slot="target")
        prompt = SoftPrompt.load(args.run)
    else:
        template = Template.parse(TEMPLATE, slot="target")
        prompt = init_prompt("vocab", template.soft_tokens, backbone, seed=0)
    generator = Generator(backbone, template, prompt.to(backbone.device), max_length=512)
    rows = [
        e.fields
        for e in load_examples(args.data / "dev.jsonl", template.fields, label_column=None)[: args.rows]
    ]
    encoded = generator.encode(rows)
    config = DecodeConfig(max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    tokens = generator.generate_tokens(encoded, config, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    ids = [[t for t in encoded.encoded.prefix if t >= 0] + body for body in encoded.encoded.bodies]
    (work / "inputs.json").write_text(json.dumps({"ids": ids, "tokens": tokens, "eos": generator.eos_id}))
    write_adapter(work / "adapter", prompt, backbone, "smollm2-135m")
    new = sum(len(t) for t in tokens)
    return _result(new, seconds, len(rows))


def _load_base():
    import torch
    from transformers import AutoModelForCausalLM

    from softprompt.backbone import smollm_gguf

    gguf = smollm_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def peft_side(args: argparse.Namespace, work: Path) -> dict:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_base(), work / "adapter").eval()
    return _hf_generate(
        args, work, lambda ids, mask, **kw: model.generate(input_ids=ids, attention_mask=mask, **kw)
    )


def transformers_side(args: argparse.Namespace, work: Path) -> dict:
    """What PEFT's generate should compute: the base model's `generate` on the prompt vectors
    followed by each row's token embeddings (left padding before the prompt, masked out)."""
    import torch
    from safetensors.torch import load_file

    model = _load_base()
    prompt = load_file(str(work / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"]

    def generate(ids, mask, **kw):
        pads = mask.shape[1] - mask.sum(1)
        embeds = model.get_input_embeddings()(ids)
        rows = [torch.cat([embeds[i, : int(p)], prompt, embeds[i, int(p) :]]) for i, p in enumerate(pads)]
        full_mask = torch.stack(
            [
                torch.cat([m[: int(p)], torch.ones(len(prompt), dtype=m.dtype), m[int(p) :]])
                for m, p in zip(mask, pads)
            ]
        )
        return model.generate(inputs_embeds=torch.stack(rows), attention_mask=full_mask, **kw)

    return _hf_generate(args, work, generate, prompt_in_output=False)


def _hf_generate(args: argparse.Namespace, work: Path, generate, prompt_in_output: bool = True) -> dict:
    """Left-padded batches through a Hugging Face `generate`; tokens up to and including EOS count."""
    import torch

    data = json.loads((work / "inputs.json").read_text())
    eos = pad = data["eos"]
    same, outputs = 0, []
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(data["ids"]), args.batch_size):
            batch = data["ids"][start : start + args.batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch])
            out = generate(
                ids,
                mask,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            out = out[:, width:] if prompt_in_output else out  # inputs_embeds: only new tokens come back
            for row in out.tolist():
                row = row[: row.index(eos) + 1] if eos in row else row
                outputs.append(row)
    seconds = time.perf_counter() - started
    for ours, theirs in zip(data["tokens"], outputs):
        same += ours == theirs
    new = sum(len(t) for t in outputs)
    return {**_result(new, seconds, len(outputs)), "same_tokens_as_softprompt": same / max(1, len(outputs))}


def _result(new_tokens: int, seconds: float, rows: int) -> dict:
    return {
        "new_tokens": new_tokens,
        "seconds": seconds,
        "new_tokens_per_s": new_tokens / seconds,
        "rows": rows,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "code_summarization"
    )
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--run", type=Path, default=None, help="use this run's prompt (default: a seeded vocab init)"
    )
    parser.add_argument("--side", choices=SIDES, help="internal: run one side here")
    parser.add_argument("--work", type=Path, help="internal: shared folder")
    args = parser.parse_args()
    if args.side:
        side = {"softprompt": softprompt_side, "peft": peft_side, "transformers": transformers_side}
        print(json.dumps(side[args.side](args, args.work)))
        return
    with tempfile.TemporaryDirectory() as work:
        results = {}
        for side in SIDES:
            command = [sys.executable, __file__, "--side", side, "--work", work, "--data", str(args.data)]
            command += ["--rows", str(args.rows), "--batch-size", str(args.batch_size)]
            command += ["--max-new-tokens", str(args.max_new_tokens)] + (
                ["--run", str(args.run)] if args.run else []
            )
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    for other in SIDES[1:]:
        results[f"ratio_vs_{other}"] = (
            results["softprompt"]["new_tokens_per_s"] / results[other]["new_tokens_per_s"]
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
