"""Serving many tuned prompts from one model: throughput of mixed-task batches, the prefix cache,
the HTTP server under concurrent clients, and short-request latency under generation load; with
--soak, the server's memory and decoding step time over minutes of a load that never lets its
decoding drain.

Workload (SmolLM2-135M, as the earlier measurements; four run folders under --runs: two classification, two generation):
  sentiment (Portuguese sentiment, 3 labels), intent (3 intents, multi-token label words),
  summ (code summarization), py2js (Python -> JavaScript); inputs are the first rows of each
  task's dev file, interleaved round-robin across the tasks as requests would arrive. A run folder
  that is missing is trained first, briefly (--train-steps steps of the examples/ task file, a few
  validation rows, no report: 2.5 minutes for all four on 2 CPU cores): a bench needs prompts of
  the right shape, not good ones.

Measured, in this order, on one loaded backbone:
  mixed_rows_per_s          the interleaved rows in batches that mix tasks (classification rows of
                            both classifiers together, up to --batch rows; generation rows of both
                            generators together, up to --gen-batch rows decoding at once, a waiting
                            row joining as soon as another finishes), prefix cache on
  per_task_rows_per_s       the same rows, one task per batch (each task's rows in turn)
  peft_swap_rows_per_s      the PEFT way: one PeftModel holding the four prompts as adapters,
                            `set_adapter` per task, so one prompt is active per forward. PEFT has
                            no prefix cache: classification runs every (row, label word) as a full
                            sequence and reads the word's log-probability; generation calls the
                            base model's `generate` with the active task's prompt spliced before
                            each row's embeddings (PEFT's own `generate` is slower still and
                            diverges after the first token with transformers 5:
                            bench/generate_vs_peft.py)
  prefix_cache_on/off_rows_per_s
                            one-row classification requests (what an HTTP client sends) of a task
                            with a 100-token soft prompt and ~15-token inputs (SST-2 dev sentences
                            of 10-20 tokens, from ../shared/data/sst2), with the prefix's
                            key/values cached, and recomputed for every request (--cache-mb 0).
                            The same with the rows gathered into batches of --batch is reported too.
  http_*                    `softprompt serve` in a subprocess with the four runs; --clients
                            concurrent async clients (httpx) send --requests one-row requests
                            interleaved across the four tasks (generations capped at
                            --max-new-tokens); requests/s, p50/p99 latency, errors, and the
                            client's own CPU share (it shares the 2 cores). The same requests are
                            then served by per-task queues (--batch-tasks 1: a batch never mixes
                            tasks): http_per_task_queue_requests_per_s.
  short_request_p99_ms_*    p99 latency of one-row sentiment requests sent one after another,
                            without load and under a steady load of 64-token py2js generations
                            from --load-clients clients.

The last stdout line is one JSON object with those keys.

Soak (--soak [MINUTES], default 10): `softprompt serve` with the two generation runs and
--soak-batch-rows rows per decoding; --soak-clients streaming clients (more than the rows a decoding
holds) each send generation after generation (8 to 64 new tokens), so rows wait at every moment and
the one decoding never drains: rows join as others finish, for the whole soak. Every minute it
samples the server's RSS (/proc), the median and p90 gap between two streamed tokens of one answer
(a decoding step, plus any prefill of joining rows that fell between), tokens streamed per second,
the rows waiting (/metrics), and the requests done and failed so far. The last stdout line is
{"soak": [one object per minute], "first": minute 1, "last": the last minute}.

    python bench/serve.py                      # ~10 minutes on 2 CPU cores (+ ~4 to train the runs)
    python bench/serve.py --soak               # 10 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TASKS = {  # name (and run folder under --runs) -> (task file it is trained from, dev file)
    "sentiment": ("examples/sentiment.yaml", "examples/data/sentimento/dev.jsonl"),
    "intent": ("examples/intent.yaml", "examples/data/intencao/dev.jsonl"),
    "summ": ("examples/code_summary.yaml", "examples/data/resumo_codigo/dev.jsonl"),
    "py2js": ("examples/py2js.yaml", "examples/data/py2js/dev.jsonl"),
}
GENERATION_TASKS = ("summ", "py2js")
LONG_PROMPT = "{soft:100} Review: {text} Sentiment: {label}"
SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.jsonl"


def ensure_runs(runs: Path, names, steps: int, backbone=None) -> dict[str, Path]:
    """The run folder of each task under `runs`; one that holds no finished run is trained first
    (an interrupted training is resumed), briefly: `steps` steps, validated once on 8 rows. The
    default model is loaded for it unless `backbone` is given."""
    from softprompt.run import INFO_FILE

    folders = {name: runs / name for name in names}
    missing = [name for name, folder in folders.items() if not (folder / INFO_FILE).is_file()]
    if not missing:
        return folders
    from rich.console import Console

    from softprompt.backbone import Backbone
    from softprompt.taskfile import load_task
    from softprompt.train import train

    print(f"training {', '.join(missing)} into {runs} ({steps} steps each): once, reused later", file=sys.stderr)
    backbone = backbone or Backbone.load("smollm2-135m")
    for name in missing:
        overrides = {"model": "smollm2-135m", "steps": steps, "eval_every": steps, "eval_limit": 8, "batch_size": 4}
        spec = load_task(ROOT / TASKS[name][0], overrides)
        console = Console(stderr=True)
        train(spec, folders[name], backbone, resume=True, console=console, baselines=False, report=False)
    return folders


def read_inputs(bank, name: str, dev: Path, n: int) -> list[dict[str, str]]:
    from softprompt.data import load_examples

    task = bank.get(name)
    examples = load_examples(dev, task.model.template.fields, task.info.columns, label_column=None)
    return [e.fields for e in examples[:n]]


def interleave(per_task: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    out, longest = [], max(map(len, per_task.values()))
    for i in range(longest):
        out += [(name, rows[i]) for name, rows in per_task.items() if i < len(rows)]
    return out


# -- in-process: mixed vs per task vs PEFT --------------------------------------------------------
def run_rows(bank, items: list[tuple[str, dict]], batch: int, gen_batch: int, max_new_tokens: int) -> dict:
    """Answer (task, row) items in the given order, batches filled in that order (so an interleaved
    order gives mixed batches, a grouped order one task per batch); returns outputs and seconds."""
    classify = [(i, it) for i, it in enumerate(items) if bank.get(it[0]).kind == "classification"]
    generate = [(i, it) for i, it in enumerate(items) if bank.get(it[0]).kind == "generation"]
    answers: list = [None] * len(items)
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(classify), batch):
            chunk = classify[s : s + batch]
            prepared = [bank.prepare(bank.get(name), [row]) for _, (name, row) in chunk]
            for (i, _), probs in zip(chunk, bank.classify_prepared(prepared)):
                answers[i] = int(probs.argmax())
        waiting, decoding, owner = list(generate), None, []
        while waiting or (decoding is not None and not decoding.done):
            room = gen_batch - (len(decoding.active) if decoding is not None and not decoding.done else 0)
            if waiting and room > 0:  # continuous batching: rows join as others finish, as the server does
                chunk, waiting = waiting[:room], waiting[room:]
                work = []
                for _, (name, row) in chunk:
                    task = bank.get(name)
                    work.append((bank.prepare(task, [row]), task.decode_config(max_new_tokens=max_new_tokens)))
                if decoding is None or decoding.done:
                    decoding, owner = bank.start_decoding(work), []
                else:
                    bank.join_decoding(decoding, work)
                owner += [i for i, _ in chunk]
            for row, _token, finished in decoding.step():
                if finished:
                    answers[owner[row]] = decoding.generated[row]
    return {"answers": answers, "seconds": time.perf_counter() - start}


def peft_swap(bank, items: list[tuple[str, dict]], batch: int, gen_batch: int, max_new_tokens: int) -> dict:
    """The same items the PEFT way: adapters switched per task, full sequences, no prefix cache."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from softprompt.backbone import smollm_gguf
    from softprompt.peft_interop import write_adapter

    gguf = smollm_gguf()
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    work = Path(tempfile.mkdtemp(prefix="peft-adapters-"))
    model = None
    for name in dict.fromkeys(n for n, _ in items):
        task = bank.get(name)
        write_adapter(work / name, task.model.lm.prompt, bank.backbone, "smollm2-135m")
        if model is None:
            model = PeftModel.from_pretrained(base, work / name, adapter_name=name).eval()
        else:
            model.load_adapter(work / name, adapter_name=name)
    tokenizer = bank.backbone.tokenizer
    eos = tokenizer.eos_token_id
    by_task: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(items):
        by_task.setdefault(name, []).append(i)
    answers: list = [None] * len(items)
    start = time.perf_counter()
    with torch.inference_mode():
        for name, index in by_task.items():
            model.set_adapter(name)
            task = bank.get(name)
            for s in range(0, len(index), batch if task.kind == "classification" else gen_batch):
                chunk = index[s : s + (batch if task.kind == "classification" else gen_batch)]
                prepared = bank.prepare(task, [items[i][1] for i in chunk])
                if task.kind == "classification":
                    for i, label in zip(chunk, _peft_classify(model, task, prepared, batch)):
                        answers[i] = label
                else:
                    for i, tokens in zip(chunk, _spliced_generate(base, task, prepared, max_new_tokens, eos)):
                        answers[i] = tokens
    return {"answers": answers, "seconds": time.perf_counter() - start}


def _peft_classify(model, task, prepared, batch: int) -> list[int]:
    """Label indices through the PeftModel (virtual tokens prepended by PEFT), as a PEFT user would
    read a verbalizer: with one-token words and nothing after the slot, one sequence per row and
    the words' logits at its end; otherwise every (row, word) as a full sequence, the word's tokens'
    log-probabilities summed. A label's score is the log-mean-exp of its words (our formula)."""
    enc, choices = prepared.encoded, task.model.choices
    fixed = [t for t in enc.prefix if t >= 0]  # the soft tokens lead the template: PEFT adds them
    one_pass = choices.single_token and not any(enc.afters)
    seqs, spans = [], []
    for body, after in zip(enc.bodies, enc.afters):
        context = fixed + body
        for word in [[]] if one_pass else choices.ids:
            seqs.append(context + word + after)
            spans.append((len(context), len(word) + len(after)))
    scores = []
    for s in range(0, len(seqs), batch):
        chunk, chunk_spans = seqs[s : s + batch], spans[s : s + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([q + [0] * (width - len(q)) for q in chunk])
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in chunk])
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        offset = logits.shape[1] - width  # PEFT's virtual tokens come first in the output
        for row, (q, (begin, length)) in enumerate(zip(chunk, chunk_spans)):
            if one_pass:
                scores.append(torch.log_softmax(logits[row, offset + begin - 1], -1)[choices.first_ids])
                continue
            positions = torch.arange(begin, begin + length)
            logp = torch.log_softmax(logits[row, offset + positions - 1], -1)
            scores.append(logp[torch.arange(length), torch.tensor(q[begin : begin + length])].sum())
    per_row = torch.stack(scores).view(len(enc.bodies), len(choices.ids))
    return choices.label_scores(per_row).argmax(-1).tolist()


def _spliced_generate(base, task, prepared, max_new_tokens: int, eos: int) -> list[list[int]]:
    """transformers' generate with the active prompt before each row (left padded)."""
    enc = prepared.encoded
    prompt = task.model.lm.prompt.vectors.detach()
    fixed = [t for t in enc.prefix if t >= 0]
    rows = [fixed + body for body in enc.bodies]
    width = max(map(len, rows))
    embed = base.get_input_embeddings()
    embeds, masks = [], []
    for row in rows:
        pad = width - len(row)
        embeds.append(torch.cat([embed(torch.zeros(pad, dtype=torch.long)), prompt, embed(torch.tensor(row))]))
        masks.append(torch.tensor([0] * pad + [1] * (len(prompt) + len(row))))
    out = base.generate(
        inputs_embeds=torch.stack(embeds),
        attention_mask=torch.stack(masks),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return [r[: r.index(eos) + 1] if eos in r else r for r in out.tolist()]


def prefix_cache(backbone, bank_cls, runs: Path, n: int, batch: int) -> dict:
    """Rows/s of classification requests of a task with a 100-token soft prompt and ~15-token
    inputs (SST-2 dev sentences of 10 to 20 tokens, one-token labels; without ../shared/data/sst2,
    the Portuguese sentiment dev texts of that length), the prefix cached or not."""
    from softprompt.run import RunInfo
    from softprompt.soft_prompt import init_prompt

    source, key = (SST2_DEV, "text") if SST2_DEV.is_file() else (ROOT / TASKS["sentiment"][1], "texto")
    texts = [json.loads(line)[key] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"text": t} for t in texts if 10 <= len(backbone.tokenize(" " + t)) <= 20][:n]
    folder = runs / "long_prompt"
    folder.mkdir(parents=True, exist_ok=True)
    init_prompt("vocab", 100, backbone, seed=0).save(folder)
    RunInfo(
        model="smollm2-135m", fingerprint=backbone.fingerprint, template=LONG_PROMPT, soft_tokens=100,
        verbalizer={"positive": ["positive"], "negative": ["negative"]}, max_length=512, init="vocab",
    ).write(folder)
    out = {}
    for label, cache_mb in (("on", 512), ("off", 0)):
        bank = bank_cls(backbone, cache_mb=cache_mb, allow=[runs])
        task = bank.load("long", folder)
        with torch.inference_mode():
            bank.classify_prepared([bank.prepare(task, rows[:1])])  # warm: the cache holds the prefix
            start = time.perf_counter()
            for row in rows:
                bank.classify_prepared([bank.prepare(task, [row])])
            single = len(rows) / (time.perf_counter() - start)
            start = time.perf_counter()
            for s in range(0, len(rows), batch):
                bank.classify_prepared([bank.prepare(task, [row]) for row in rows[s : s + batch]])
            batched = len(rows) / (time.perf_counter() - start)
        out[label] = (single, batched)
    encoded = bank.prepare(task, rows).encoded
    return {
        "prefix_cache_on_rows_per_s": out["on"][0],
        "prefix_cache_off_rows_per_s": out["off"][0],
        "prefix_cache_speedup": out["on"][0] / out["off"][0],
        "prefix_cache_on_batched_rows_per_s": out["on"][1],
        "prefix_cache_off_batched_rows_per_s": out["off"][1],
        "prefix_rows_from": os.path.relpath(source, ROOT),
        "prefix_tokens": len(encoded.prefix),  # 100 soft tokens + the fixed text before the input
        "row_tokens_mean": statistics.mean(len(b) for b in encoded.bodies),  # the input + " Sentiment:"
    }


# -- HTTP ------------------------------------------------------------------------------------------
def start_server(port: int, runs: list[str], *options: str) -> subprocess.Popen:
    """`softprompt serve RUNS --port PORT OPTIONS` in a subprocess, once it answers /healthz."""
    import httpx

    cmd = [sys.executable, "-m", "softprompt.cli", "serve", *runs, "--port", str(port), *options]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("server did not start")


def request_body(bank_kinds: dict[str, str], name: str, row: dict, max_new_tokens: int) -> tuple[str, dict]:
    if bank_kinds[name] == "classification":
        return "/v1/classify", {"task": name, "inputs": [row]}
    return "/v1/generate", {"task": name, "inputs": [row], "max_new_tokens": max_new_tokens}


async def load_test(url: str, work: list[tuple[str, dict]], clients: int) -> dict:
    """`clients` workers take requests from one shared list in order; latencies and errors."""
    import httpx

    queue = list(enumerate(work))
    latencies, errors = [], 0
    cpu0 = time.process_time()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            _, (path, body) = queue.pop(0)
            start = time.perf_counter()
            try:
                response = await http.post(url + path, json=body, timeout=300)
                if response.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with httpx.AsyncClient() as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "requests_per_s": len(work) / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors,
        "client_cpu_share": (time.process_time() - cpu0) / wall,
    }


async def short_latency(url: str, rows: list[dict], load: list[dict] | None, load_clients: int) -> float:
    """p99 ms of one-row sentiment requests sent one after another, optionally while clients keep
    the server busy with generations."""
    import httpx

    stop = asyncio.Event()

    async def generate_forever(http: httpx.AsyncClient, k: int) -> None:
        i = k
        while not stop.is_set():
            await http.post(url + "/v1/generate", json=load[i % len(load)], timeout=300)
            i += load_clients

    async with httpx.AsyncClient() as http:
        loaders = [asyncio.create_task(generate_forever(http, k)) for k in range(load_clients if load else 0)]
        if loaders:
            await asyncio.sleep(2.0)  # let the generations fill the scheduler
        latencies = []
        for row in rows:
            start = time.perf_counter()
            response = await http.post(url + "/v1/classify", json={"task": "sentiment", "inputs": [row]}, timeout=300)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
        stop.set()
        await asyncio.gather(*loaders, return_exceptions=True)
    latencies.sort()
    return 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]


# -- soak: a decoding that never drains ------------------------------------------------------------
def soak_bodies(clients: int) -> list[dict]:
    """Streamed generations of the two generation tasks' dev rows, 8 to 64 new tokens."""
    rows = {}
    for name in GENERATION_TASKS:
        lines = (ROOT / TASKS[name][1]).read_text(encoding="utf-8").splitlines()
        rows[name] = [json.loads(line)["input"] for line in lines if line.strip()]
    bodies = []
    for k in range(max(40, clients)):
        name = GENERATION_TASKS[k % 2]
        text = rows[name][(k // 2) % len(rows[name])]
        bodies.append({"task": name, "inputs": [{"input": text}], "max_new_tokens": 8 * 2 ** (k % 4), "stream": True})
    return bodies


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def soak(url: str, pid: int, clients: int, minutes: float, sample_s: float, max_requests: int) -> list[dict]:
    """`clients` streaming clients send generation after generation for `minutes` (at most
    `max_requests` requests); one sample of the server every `sample_s` seconds. A streamed piece
    is one token's text (a character split across tokens comes once, whole)."""
    import httpx

    bodies = soak_bodies(clients)
    done, errors, tokens, gaps = 0, 0, 0, []  # gaps and tokens: since the last sample
    start = time.monotonic()
    deadline = start + 60 * minutes

    async def client(http: httpx.AsyncClient, k: int) -> None:
        nonlocal done, errors, tokens
        i = k
        while time.monotonic() < deadline and done + errors < max_requests:
            body, i = bodies[i % len(bodies)], i + clients
            last, answered = None, False
            try:
                async with http.stream("POST", url + "/v1/generate", json=body, timeout=300) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[len("data: ") :])
                        if "text" in event:  # one decoded piece of the answer
                            now = time.perf_counter()
                            if last is not None:
                                gaps.append(now - last)
                            last, tokens = now, tokens + 1
                        answered = answered or (event.get("done") and response.status_code == 200)
            except httpx.HTTPError:
                pass
            done, errors = (done + 1, errors) if answered else (done, errors + 1)

    async def queued_rows(http: httpx.AsyncClient) -> float | None:
        try:
            text = (await http.get(url + "/metrics", timeout=10)).text
        except httpx.HTTPError:
            return None
        found = [line.split()[1] for line in text.splitlines() if line.startswith("softprompt_queue_rows ")]
        return float(found[0]) if found else None

    samples = []
    async with httpx.AsyncClient() as http:
        workers = [asyncio.create_task(client(http, k)) for k in range(clients)]
        for n in range(1, int(60 * minutes // sample_s) + 1):
            await asyncio.sleep(max(0.0, start + n * sample_s - time.monotonic()))
            taken, gaps[:] = sorted(gaps), []
            per_s, tokens = tokens / sample_s, 0
            samples.append({
                "minute": round(n * sample_s / 60, 2),
                "rss_mb": round(rss_mb(pid), 1),
                "step_ms_p50": round(1000 * taken[len(taken) // 2], 1) if taken else None,
                "step_ms_p90": round(1000 * taken[int(0.9 * len(taken))], 1) if taken else None,
                "tokens_per_s": round(per_s, 1),
                "rows_waiting": await queued_rows(http),
                "requests_done": done,
                "errors": errors,
            })
            print(json.dumps(samples[-1]), file=sys.stderr)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return samples


def run_soak(args, folders: dict[str, Path]) -> dict:
    runs = [f"{name}={folders[name]}" for name in GENERATION_TASKS]
    server = start_server(args.port, runs, "--batch-rows", str(args.soak_batch_rows))
    try:
        url = f"http://127.0.0.1:{args.port}"
        samples = asyncio.run(
            soak(url, server.pid, args.soak_clients, args.soak, args.soak_sample_s, args.soak_max_requests)
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    setup = dict(minutes=args.soak, clients=args.soak_clients, batch_rows=args.soak_batch_rows, cpus=os.cpu_count())
    first, last = (samples[0], samples[-1]) if samples else (None, None)
    return {"soak_setup": setup, "soak": samples, "first": first, "last": last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cls-rows", type=int, default=48, help="rows per classification task")
    parser.add_argument("--gen-rows", type=int, default=12, help="rows per generation task")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=120, help="HTTP requests per load test")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--load-clients", type=int, default=3)
    parser.add_argument("--short-requests", type=int, default=60)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench", help="run folders (trained if missing)")
    parser.add_argument("--train-steps", type=int, default=8, help="steps of a run trained because it is missing")
    parser.add_argument("--soak", type=float, nargs="?", const=10.0, help="soak N minutes (default 10) instead")
    parser.add_argument("--soak-clients", type=int, default=8, help="streaming generation clients of the soak")
    parser.add_argument("--soak-batch-rows", type=int, default=4, help="the soak server's --batch-rows")
    parser.add_argument("--soak-sample-s", type=float, default=60, help="seconds between two samples of the soak")
    parser.add_argument("--soak-max-requests", type=int, default=100_000)
    args = parser.parse_args()

    if args.soak is not None:
        print(json.dumps(run_soak(args, ensure_runs(args.runs, GENERATION_TASKS, args.train_steps))))
        return
    from softprompt.backbone import Backbone
    from softprompt.serve.bank import TaskBank

    backbone = Backbone.load("smollm2-135m")
    folders = ensure_runs(args.runs, TASKS, args.train_steps, backbone)
    bank = TaskBank(backbone, allow=[args.runs.resolve()])
    for name, folder in folders.items():
        bank.load(name, folder)
    per_task = {
        name: read_inputs(bank, name, ROOT / dev, args.cls_rows if bank.get(name).kind == "classification" else args.gen_rows)
        for name, (_, dev) in TASKS.items()
    }
    items = interleave(per_task)
    grouped = sorted(items, key=lambda it: list(TASKS).index(it[0]))
    n = len(items)
    result: dict = {"rows": n, "tasks": {k: len(v) for k, v in per_task.items()}, "max_new_tokens": args.max_new_tokens}

    run_rows(bank, items[:8], args.batch, args.gen_batch, 4)  # warm up (and fill the prefix cache)
    mixed = run_rows(bank, items, args.batch, args.gen_batch, args.max_new_tokens)
    separate = run_rows(bank, grouped, args.batch, args.gen_batch, args.max_new_tokens)
    order = {id(it): i for i, it in enumerate(items)}
    separate_answers = [None] * n
    for it, answer in zip(grouped, separate["answers"]):
        separate_answers[order[id(it)]] = answer
    peft = peft_swap(bank, items, args.batch, args.gen_batch, args.max_new_tokens)
    result.update(
        mixed_rows_per_s=n / mixed["seconds"],
        per_task_rows_per_s=n / separate["seconds"],
        peft_swap_rows_per_s=n / peft["seconds"],
        mixed_vs_per_task=separate["seconds"] / mixed["seconds"],
        mixed_vs_peft_swap=peft["seconds"] / mixed["seconds"],
        mixed_equals_per_task=sum(a == b for a, b in zip(mixed["answers"], separate_answers)) / n,
        peft_swap_equals_mixed=sum(a == b for a, b in zip(mixed["answers"], peft["answers"])) / n,
    )
    print(json.dumps(result), file=sys.stderr)

    with tempfile.TemporaryDirectory(dir=args.runs) as tmp:
        result.update(prefix_cache(backbone, TaskBank, Path(tmp), args.cls_rows, args.batch))
    print(json.dumps(result), file=sys.stderr)
    del bank, backbone

    kinds = {"sentiment": "classification", "intent": "classification", "summ": "generation", "py2js": "generation"}
    work = [request_body(kinds, name, row, args.max_new_tokens) for name, row in items]
    work = (work * (args.requests // len(work) + 1))[: args.requests]
    runs = [f"{name}={folder}" for name, folder in folders.items()]
    for label, batch_tasks in (("mixed", 8), ("per_task_queue", 1)):
        server = start_server(args.port, runs, "--batch-tasks", str(batch_tasks))
        try:
            asyncio.run(load_test(f"http://127.0.0.1:{args.port}", work[:8], args.clients))  # warm up
            stats = asyncio.run(load_test(f"http://127.0.0.1:{args.port}", work, args.clients))
            if label == "mixed":
                result.update({f"http_{k}": v for k, v in stats.items()})
                url = f"http://127.0.0.1:{args.port}"
                short_rows = (per_task["sentiment"] * 3)[: args.short_requests]
                load = [{"task": "py2js", "inputs": [r], "max_new_tokens": 64} for r in per_task["py2js"]]
                result["short_request_p99_ms_no_load"] = asyncio.run(short_latency(url, short_rows, None, 0))
                result["short_request_p99_ms_under_generation_load"] = asyncio.run(
                    short_latency(url, short_rows, load, args.load_clients)
                )
            else:
                result["http_per_task_queue_requests_per_s"] = stats["requests_per_s"]
                result["http_per_task_queue_p99_ms"] = stats["p99_ms"]
        finally:
            server.terminate()
            server.wait(timeout=30)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["torch_threads"] = torch.get_num_threads()
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
