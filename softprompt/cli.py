"""The `softprompt` command line: train, doctor, eval, predict, inspect, model."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .artifact import load_run
from .auto import AutoError
from .backbone import Backbone, ModelNotFound
from .calibration import is_calibrated
from .data import DataError, load_examples
from .distributed import LaunchError
from .doctor import ZERO_SHOT_ROWS, diagnose
from .generate import DecodeConfig, Generator
from .methods import DEFAULT_METHOD, METHODS, MethodError, method_class
from .metrics import classification_report
from .peft_interop import export_peft, import_peft
from .run import INFO_FILE, ArtifactError, RunInfo, write_atomic
from .soft_prompt import InitError
from .task import ROLES, make_task, score_generations, write_predictions
from .taskfile import GenerationSpec, TaskError, load_task
from .template import TemplateError, summarize_cuts
from .verbalizer import VerbalizerError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Prompt tuning for frozen language models."
)
console = Console(stderr=True)
MATRIX_LABELS = 12  # eval prints the confusion matrix up to this many labels, else the top confusions
TOP_CONFUSIONS = 15
USER_ERRORS = (
    TaskError, DataError, TemplateError, VerbalizerError, ArtifactError, InitError, ModelNotFound, MethodError,
    AutoError, LaunchError,
)


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _backbone(run: Path, model: str | None) -> Backbone:
    spec = model or RunInfo.read(run).model
    with console.status(f"loading model {spec} ..."):
        return Backbone.load(spec)


ModelOption = Annotated[Optional[str], typer.Option(help="'default' (gemma3-270m), 'smollm2-135m', a model folder, a hub id or a .gguf file")]
# `softprompt train` flags that override the task file (names as in TaskSpec / TrainSettings)
InitOption = Annotated[Optional[str], typer.Option(help='random | vocab | text:"..." | labels | demos | from:RUN')]
StepsOption = Annotated[Optional[int], typer.Option(help="optimizer steps")]
EpochsOption = Annotated[Optional[float], typer.Option(help="epochs, when --steps is not given")]
LrOption = Annotated[Optional[float], typer.Option(help="peak learning rate")]
AccumOption = Annotated[Optional[int], typer.Option(help="micro-batches per step")]
OptimizerOption = Annotated[Optional[str], typer.Option(help="adamw | adafactor")]
ScheduleOption = Annotated[Optional[str], typer.Option(help="linear | cosine | constant")]
ShotsOption = Annotated[Optional[int], typer.Option(help="few-shot: K training rows per label")]
EvalEveryOption = Annotated[Optional[int], typer.Option(help="validate every k steps")]
EvalLimitOption = Annotated[Optional[int], typer.Option(help="validation rows at most (a seeded, label-stratified sample)")]
ReportLimitOption = Annotated[Optional[int], typer.Option(help="score the final report on at most N dev rows (seeded sample)")]
PatienceOption = Annotated[Optional[int], typer.Option(help="early-stopping patience, in validations")]
MaxLengthOption = Annotated[
    Optional[int], typer.Option(help="prompt tokens per row (soft + fixed text + input; inputs are cut to fit)")
]
ActivationMemoryOption = Annotated[
    Optional[int], typer.Option(help="MiB of activations a training step keeps; beyond, layers are recomputed (0: all)")
]
BucketingOption = Annotated[
    Optional[bool], typer.Option("--length-bucketing/--no-length-bucketing", help="batch rows of similar length")
]
ResumeOption = Annotated[
    bool, typer.Option(help="continue an interrupted run in --out (same task file and flags: anything else is refused)")
]
MethodOption = Annotated[str, typer.Option(help="what to train: " + ", ".join(METHODS) + " (see README, 'Methods')")]
ZeroShotOption = Annotated[
    bool, typer.Option("--zero-shot/--no-zero-shot", help="also score zero-shot prompting (validation and dev)")
]
ReportOption = Annotated[bool, typer.Option("--report/--no-report", help="score the dev rows at the end")]
DevOption = Annotated[
    Optional[Path], typer.Option(help="rows of the final report instead of the task's dev file (e.g. a test split)")
]
AutoOption = Annotated[
    bool,
    typer.Option(help="search the recipe (lr, init, label vectors, plain or residual, prompt length) on short "
                 "runs, choose on the validation rows, then train the winner; --lr/--init/--method fix theirs"),
]
BudgetOption = Annotated[Optional[str], typer.Option(help="--auto: wall time for the trials and the final run together (default 20m)")]


@app.command()
def train(
    task: Annotated[Path, typer.Argument(help="task file (YAML)")],
    out: Annotated[Path, typer.Option(help="run folder to write")],
    model: ModelOption = None,
    init: InitOption = None,
    steps: StepsOption = None,
    epochs: EpochsOption = None,
    lr: LrOption = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    grad_accum: AccumOption = None,
    optimizer: OptimizerOption = None,
    schedule: ScheduleOption = None,
    shots: ShotsOption = None,
    eval_every: EvalEveryOption = None,
    eval_limit: EvalLimitOption = None,
    report_limit: ReportLimitOption = None,
    patience: PatienceOption = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    max_length: MaxLengthOption = None,
    activation_memory: ActivationMemoryOption = None,
    length_bucketing: BucketingOption = None,
    resume: ResumeOption = False,
    method: MethodOption = DEFAULT_METHOD,
    zero_shot: ZeroShotOption = True,
    report: ReportOption = True,
    dev: DevOption = None,
    auto: AutoOption = False,
    budget: BudgetOption = None,
) -> None:
    """Train a soft prompt (or another --method) on a frozen model: zero-shot first, then
    validation as it goes.

    Validation (which chooses the kept state and stops early) uses a seeded slice of the training
    rows; the dev file is only scored, with zero-shot prompting before training and the kept state after."""
    from .train import train as run_training

    overrides = dict(
        model=model, init=init, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
        optimizer=optimizer, schedule=schedule, shots=shots, eval_every=eval_every, eval_limit=eval_limit,
        report_limit=report_limit, patience=patience, seed=seed, max_length=max_length,
        activation_memory=activation_memory, length_bucketing=length_bucketing,
    )
    try:
        spec = _training_spec(task, overrides, method=method, dev=dev)
        if budget is not None and not auto:
            raise AutoError("--budget is the time of an --auto search: add --auto, or drop --budget")
        if auto:
            fixed = {name for name in ("lr", "init") if overrides[name] is not None}
            _train_auto(spec, out, method=method, fixed=fixed, budget=budget, resume=resume, zero_shot=zero_shot, report=report)
        else:
            run_training(spec, out, resume=resume, console=console, method=method, baselines=zero_shot, report=report)
    except USER_ERRORS as err:
        _fail(err)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _training_spec(task: Path, overrides: dict, *, method: str, dev: Path | None):
    """The task file with the command line's overrides, as training reads it."""
    spec = load_task(task, overrides)
    if overrides["epochs"] is not None and overrides["steps"] is None:
        spec.train.steps = None  # --epochs on the command line beats steps from the task file
    if dev is not None:
        spec.data.dev = str(dev.resolve())
    if overrides["lr"] is None and method in METHODS and not METHODS[method].task_lr:
        # a task file's train.lr is a soft prompt's rate; other methods start from their own default
        spec.train.lr = METHODS[method].lr or spec.train.lr
    return spec


def _train_auto(
    spec, out: Path, *, method: str, fixed: set[str], budget: str | None, resume: bool, zero_shot: bool, report: bool
) -> None:
    from .auto import SEARCHED_METHODS, run_auto
    from .compare.grid import parse_budget
    from .train import find_checkpoint

    if resume:
        raise AutoError("--auto cannot resume (its trials are short runs): start it again with a new --out")
    if method not in SEARCHED_METHODS:
        raise AutoError(f"--auto searches the soft-prompt methods ({', '.join(SEARCHED_METHODS)}), not {method!r}")
    fixed = fixed | ({"method"} if method != DEFAULT_METHOD else set())
    if (out / INFO_FILE).exists() or find_checkpoint(out):
        raise AutoError(f"{out} already holds a run: choose another --out")
    try:
        budget_s = parse_budget(budget)
    except ValueError as err:  # compare's budget syntax, refused as a user error here too
        raise AutoError(str(err)) from err
    with console.status(f"loading model {spec.model} ..."):
        backbone = Backbone.load(spec.model)
    console.print(f"model {spec.model} loaded in {backbone.load_seconds:.1f}s")
    run_auto(
        spec, out, backbone, console, budget_s, frozenset(fixed), baselines=zero_shot, report=report,
        method=method,
    )


@app.command()
def doctor(
    task: Annotated[Path, typer.Argument(help="task file (YAML)")],
    model: Annotated[
        Optional[str], typer.Option(help="'default' (gemma3-270m), 'smollm2-135m', a model folder, a hub id or a .gguf file")
    ] = None,
    zero_shot: Annotated[
        bool,
        typer.Option(
            "--zero-shot/--no-zero-shot",
            help=f"score up to {ZERO_SHOT_ROWS} validation rows with plain prompting and compare with chance",
        ),
    ] = True,
) -> None:
    """Check a task before training it: label words, where the label sits, label balance, cut
    inputs, the step budget, rows shared between train and the other roles, zero-shot accuracy.
    Each problem comes with its fix. Exit code 1 when there is a warning, 2 when the task cannot be read."""
    try:
        spec = load_task(task, {"model": model})
        with console.status(f"loading model {spec.model} ..."):
            backbone = Backbone.load(spec.model)
        checked = make_task(spec, backbone)
        with console.status("checking" + (" (scoring zero-shot)" if zero_shot else "") + " ..."):
            findings = diagnose(checked, backbone, zero_shot=zero_shot)
    except USER_ERRORS as err:
        _fail(err)
    show = Console()
    for finding in findings:
        show.print(f"{finding.console_line()} [dim]({finding.code})", highlight=False, soft_wrap=True)
    warnings = sum(f.level == "warn" for f in findings)
    rows = ", ".join(f"{len(getattr(checked.splits, role))} {role}" for role in ROLES)
    verdict = f"{warnings} warnings, {len(findings) - warnings} notes" if findings else "no problems found"
    show.print(f"[bold]{escape(str(task))}[/]: {verdict} ({checked.kind}; {rows} rows; model {spec.model})", highlight=False, soft_wrap=True)
    if warnings:
        raise typer.Exit(1)


def _decode_options(
    info: RunInfo,
    *,
    max_new_tokens: int | None,
    num_beams: int | None,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
) -> DecodeConfig:
    """The command line's decoding settings, the run's own where a flag is not given."""
    saved = info.generation or {}
    return DecodeConfig(
        max_new_tokens=max_new_tokens or saved.get("max_new_tokens", 128),
        num_beams=num_beams or saved.get("num_beams", 1),
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        stop=stop if stop is not None else saved.get("stop", []),
    )


MaxNewTokens = Annotated[Optional[int], typer.Option(help="generation: tokens to generate at most")]
NumBeams = Annotated[Optional[int], typer.Option(help="generation: beam search width (1 = greedy)")]
Sample = Annotated[bool, typer.Option("--sample", help="generation: sample instead of greedy/beam")]
Temperature = Annotated[float, typer.Option(help="generation: sampling temperature")]
TopP = Annotated[float, typer.Option(help="generation: nucleus sampling mass")]
Stop = Annotated[Optional[list[str]], typer.Option(help="generation: stop string (repeatable)")]
ColumnMap = Annotated[
    Optional[list[str]],
    typer.Option(
        "--column",
        help="FIELD=COLUMN: read a template field (or target, label, tests) from another column "
        "of this file (repeatable)",
    ),
]


@app.command("eval")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="run folder")],
    data: Annotated[Path, typer.Option(help="labelled rows (.jsonl, .csv, .tsv)")],
    model: Annotated[Optional[str], typer.Option(help="override the run's model")] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    limit: Annotated[Optional[int], typer.Option(help="score only the first N rows")] = None,
    out: Annotated[Optional[Path], typer.Option(help="generation: per-row predictions file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    max_new_tokens: MaxNewTokens = None,
    num_beams: NumBeams = None,
    column: ColumnMap = None,
) -> None:
    """Score a run on labelled data: accuracy, macro-F1, per-class P/R/F1 and confusion matrix for
    classification; the task's metrics and per-row predictions for generation."""
    try:
        task_model, info = load_run(run, _backbone(run, model))
        fields = task_model.template.fields
        info.remap(column, fields)
        if isinstance(task_model, Generator):
            keep = [info.tests_column] if info.tests_column else None
            examples = load_examples(data, fields, info.columns, info.target_column, keep=keep)[:limit]
        else:
            examples = load_examples(data, fields, info.columns, info.label_column, task_model.labels)[:limit]
    except USER_ERRORS as err:
        _fail(err)
    if isinstance(task_model, Generator):
        try:
            return _eval_generation(
                task_model, info, examples, run=run, data=data, out=out, batch_size=batch_size, as_json=as_json,
                config=_decode_options(info, max_new_tokens=max_new_tokens, num_beams=num_beams),
            )
        except USER_ERRORS as err:  # e.g. pass_rate without node
            _fail(err)
    rows = task_model.encode([e.fields for e in examples], [str(e.label) for e in examples])
    _warn_cuts(rows.encoded, [e.source for e in examples], info.max_length)
    with _progress("scoring", len(examples)) as advance:  # only the answers: the pruned search
        predicted = task_model.predict(rows, batch_size, advance)
    report = classification_report(rows.labels.tolist(), predicted.tolist(), task_model.labels)
    if as_json:
        print(json.dumps(report))
        return
    show = Console()
    show.print(
        f"[bold]{data}[/]: n={report['n']}  accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}"
    )
    table = Table("label", "precision", "recall", "f1", "support")
    for label, m in report["per_class"].items():
        table.add_row(
            label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"])
        )
    show.print(table)
    show.print(_confusions(report))


def _confusions(report: dict) -> Table:
    """The confusion matrix where it fits a terminal (MATRIX_LABELS labels at most); past that, the
    most frequent confusions, gold -> predicted (77 intents' matrix is unreadable text; its figure
    is in the run folder)."""
    labels, confusion = report["labels"], report["confusion"]
    if len(labels) <= MATRIX_LABELS:
        matrix = Table("gold \\ predicted", *labels, title="confusion matrix")
        for label, row in zip(labels, confusion):
            matrix.add_row(label, *map(str, row))
        return matrix
    pairs = [(n, g, p) for g, row in enumerate(confusion) for p, n in enumerate(row) if g != p and n]
    pairs.sort(key=lambda pair: (-pair[0], pair[1], pair[2]))
    top = Table("gold", "predicted", "rows", title="most frequent confusions")
    for n, g, p in pairs[:TOP_CONFUSIONS]:
        top.add_row(labels[g], labels[p], str(n))
    return top


def _eval_generation(
    generator: Generator, info: RunInfo, examples: list, *, run: Path, data: Path, out: Path | None,
    batch_size: int, as_json: bool, config: DecodeConfig,
) -> None:
    rows = generator.encode([e.fields for e in examples])
    _warn_cuts(rows.encoded, [e.source for e in examples], info.max_length)
    with _progress("decoding", len(examples)) as advance:
        predictions = generator.generate(rows, config, min(batch_size, 16), advance)
    spec = GenerationSpec.model_validate(info.generation or {})
    report = score_generations(predictions, examples, spec, info.tests_column)
    out = out or Path(run) / f"eval_{Path(data).stem}.predictions.jsonl"
    write_predictions(out, report.pop("rows"))
    if as_json:
        print(json.dumps(report))
        return
    scores = "  ".join(f"{k} {v:.2f}" for k, v in report.items() if k != "n")
    Console().print(f"[bold]{data}[/]: n={report['n']}  {scores}")
    console.print(f"per-row predictions written to {out}")


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="run folder")],
    text: Annotated[Optional[str], typer.Argument(help="one input (templates with a single field)")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", help="rows to run (.jsonl, .csv, .tsv)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write JSONL here instead of stdout")] = None,
    model: Annotated[Optional[str], typer.Option(help="override the run's model")] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    max_new_tokens: MaxNewTokens = None,
    num_beams: NumBeams = None,
    sample: Sample = False,
    temperature: Temperature = 1.0,
    top_p: TopP = 1.0,
    stop: Stop = None,
    column: ColumnMap = None,
    probabilities: Annotated[
        bool,
        typer.Option(
            "--probabilities/--no-probabilities",
            help="classification: every label's probability, or only the label (found without scoring every label)",
        ),
    ] = True,
) -> None:
    """Label (classification) or answer (generation) one text, or every row of --input (JSONL out)."""
    if (text is None) == (input is None):
        _fail(ValueError("give either a TEXT or --input FILE"))
    try:
        task_model, info = load_run(run, _backbone(run, model))
        fields = task_model.template.fields
        info.remap(column, fields)
        if text is not None:
            if len(fields) != 1:
                raise DataError(f"the template has fields {fields}: use --input with a row per input")
            rows, sources = [{fields[0]: text}], ["the text given"]
        else:
            examples = load_examples(input, fields, info.columns, label_column=None)
            rows, sources = [e.fields for e in examples], [e.source for e in examples]
    except USER_ERRORS as err:
        _fail(err)
    encoded = task_model.encode(rows)
    _warn_cuts(encoded.encoded, sources, info.max_length)
    if isinstance(task_model, Generator):
        config = _decode_options(
            info, max_new_tokens=max_new_tokens, num_beams=num_beams, sample=sample, temperature=temperature,
            top_p=top_p, stop=stop,
        )
        with _progress("decoding", len(rows)) as advance:
            results = [{"prediction": a} for a in task_model.generate(encoded, config, batch_size, advance)]
    elif not probabilities:
        with _progress("scoring", len(rows)) as advance:
            predicted = task_model.predict(encoded, batch_size, advance)
        results = [{"label": task_model.labels[int(i)]} for i in predicted]
    else:
        with _progress("scoring", len(rows)) as advance:
            probs = task_model.predict_proba(encoded, batch_size, advance)
        labels = task_model.labels
        results = [{"label": labels[int(p.argmax())], "probabilities": dict(zip(labels, map(float, p)))} for p in probs]
    if text is not None and out is None:
        return _show_one(results[0])
    lines = "".join(json.dumps({**row, **r}, ensure_ascii=False) + "\n" for row, r in zip(rows, results))
    if out is None:
        sys.stdout.write(lines)
    else:
        write_atomic(out, lines)
        console.print(f"{len(results)} predictions written to {out}")


def _show_one(result: dict) -> None:
    """One text's answer on the terminal: the generation, the label alone, or the labels by probability."""
    if "probabilities" not in result:
        Console().print(result.get("prediction", result.get("label")), highlight=False, markup=False)
        return
    table = Table("label", "probability", title=f"prediction: [bold]{result['label']}")
    for label, p in sorted(result["probabilities"].items(), key=lambda kv: -kv[1]):
        table.add_row(label, f"{p:.3f}")
    Console().print(table)


def _warn_cuts(encoded, sources: list[str], max_length: int) -> None:
    """Say how much input the run's length budget cut, loudly when it is more than a few rows."""
    summary = summarize_cuts(encoded, sources)
    if summary is None:
        return
    console.print(summary.console_line("input", f"the run's max_length {max_length}"), highlight=False, soft_wrap=True)


@contextmanager
def _progress(what: str, total: int):
    """A progress bar on stderr; yields the function that advances it."""
    with Progress(
        TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


@app.command()
def inspect(
    run: Annotated[Path, typer.Argument(help="run folder")],
    k: Annotated[int, typer.Option(help="nearest tokens per soft token")] = 5,
    model: Annotated[Optional[str], typer.Option(help="override the run's model")] = None,
) -> None:
    """For each soft token: its norm and its nearest vocabulary tokens (cosine)."""
    try:
        task_model, info = load_run(run, _backbone(run, model))  # a classifier or a generator
    except USER_ERRORS as err:
        _fail(err)
    prompt, backbone = task_model.lm.prompt, task_model.backbone
    if not method_class(info.method).plain_prompt:
        fell_back = info.method_settings.get("fell_back_from")
        why = f" (its {fell_back} training scored under zero-shot on validation and was not kept: task.json, validation.fell_back)" if fell_back else ""
        _fail(ArtifactError(f"{run}: a {info.method!r} run holds no soft vectors to inspect{why}"))
    vocab_norm = prompt.vocab_norm(backbone)
    table = Table(
        "#",
        "norm",
        "nearest tokens (cosine)",
        title=f"{run}: {prompt.length} soft tokens, template {info.template!r}",
    )
    for i, (vec, near) in enumerate(zip(prompt.vectors, prompt.nearest_tokens(backbone, k))):
        table.add_row(
            str(i), f"{float(vec.detach().norm()):.2f}", "  ".join(f"{tok!r} {sim:.2f}" for tok, sim in near)
        )
    Console().print(table)
    console.print(f"(vocabulary embeddings have mean norm {vocab_norm:.2f})")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="run folder")],
    peft: Annotated[Path, typer.Option(help="folder to write the PEFT adapter to")],
    model: Annotated[Optional[str], typer.Option(help="override the run's model")] = None,
) -> None:
    """Write the run's prompt as a PEFT prompt-tuning adapter (PeftModel.from_pretrained loads it)."""
    try:
        folder = export_peft(run, peft, _backbone(run, model))
    except USER_ERRORS as err:
        _fail(err)
    console.print(f"PEFT adapter written to {folder}")
    info = RunInfo.read(run)
    left = [what for what, present in (("learned label vectors", info.label_vectors),
            ("calibration", is_calibrated(info))) if present]
    if left:
        console.print(f"[yellow]note: PEFT's prompt-tuning format holds the prompt only; the run's {' and '.join(left)} stay behind")


@app.command("import-peft")
def import_peft_cmd(
    adapter: Annotated[Path, typer.Argument(help="PEFT prompt-tuning adapter folder")],
    out: Annotated[Path, typer.Option(help="run folder to create")],
    task: Annotated[
        Optional[Path], typer.Option(help="task file giving the template (and verbalizer)")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help="base model (default: the task's, else 'default')")
    ] = None,
) -> None:
    """Turn a PEFT prompt-tuning adapter into a run to evaluate, predict with or train further (init from:RUN)."""
    try:
        spec = load_task(task) if task else None
        spec_model = model or (spec.model if spec else "default")
        with console.status(f"loading model {spec_model} ..."):
            backbone = Backbone.load(spec_model)
        info = import_peft(adapter, out, backbone, spec)
    except USER_ERRORS as err:
        _fail(err)
    console.print(
        f"imported {info.soft_tokens} virtual tokens into {out} ({info.kind}, template {info.template!r})"
    )
    if (info.base_model_check or "").startswith("unverified"):
        console.print(
            f"[yellow]warning:[/] could not check that {adapter} was trained on {backbone.spec!r} "
            f"({info.base_model_check}); on another model the prompt means nothing",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def serve(
    runs: Annotated[list[str], typer.Argument(help="run folders to serve, each PATH or NAME=PATH (name: the folder's name)")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    model: Annotated[Optional[str], typer.Option(help="the backbone (default: the first run's model)")] = None,
    allow: Annotated[
        Optional[list[Path]],
        typer.Option(help="folders runs may be loaded from at run time (POST /v1/tasks); repeatable; default: the current folder and the folders of the runs given"),
    ] = None,
    token: Annotated[Optional[str], typer.Option(help="require 'Authorization: Bearer TOKEN' on every route but /healthz", envvar="SOFTPROMPT_TOKEN")] = None,
    cache_mb: Annotated[float, typer.Option(help="memory for the per-task prefix caches (LRU); 0 turns caching off")] = 512,
    window_ms: Annotated[float, typer.Option(help="how long a request waits for others to share its batch")] = 5,
    batch_rows: Annotated[int, typer.Option(help="rows per batch at most")] = 16,
    batch_tasks: Annotated[int, typer.Option(help="distinct tasks per batch at most")] = 8,
    queue_rows: Annotated[int, typer.Option(help="rows waiting at most; beyond, requests get 429")] = 256,
    max_rows: Annotated[int, typer.Option(help="rows per request at most (413 beyond)")] = 64,
    max_input_chars: Annotated[int, typer.Option(help="characters per input field at most (413 beyond)")] = 20_000,
    max_new_tokens: Annotated[int, typer.Option(help="max_new_tokens a request may ask at most (422 beyond)")] = 512,
    max_body_mb: Annotated[float, typer.Option(help="request body size at most, counted as it is read, chunked or not (413 beyond)")] = 8,
) -> None:
    """Serve many tuned prompts from one loaded model: HTTP API, OpenAI completions, web page at /."""
    import uvicorn

    from .serve.app import Limits, create_app
    from .serve.bank import BankError, TaskBank
    from .serve.scheduler import Scheduler
    from .serve.telemetry import Telemetry

    named = [(r.partition("=")[0], r.partition("=")[2]) if "=" in r else (Path(r).name, r) for r in runs]
    names = [n for n, _ in named]
    if len(set(names)) < len(names):
        _fail(ValueError(f"two runs share a task name ({', '.join(names)}): name them with NAME=PATH"))
    try:
        spec = model or RunInfo.read(named[0][1]).model
        with console.status(f"loading model {spec} ..."):
            backbone = Backbone.load(spec)
        roots = list(allow or []) or [Path.cwd(), *{Path(p).resolve().parent for _, p in named}]
        bank = TaskBank(backbone, cache_mb=cache_mb, allow=roots)
        for name, path in named:
            task = bank.load(name, path)
            console.print(f"task [bold]{name}[/] ({task.kind}) from {path}")
    except (*USER_ERRORS, BankError) as err:
        _fail(err)
    telemetry = Telemetry()
    scheduler = Scheduler(bank, telemetry, window_ms, batch_rows, batch_tasks, queue_rows).start()
    limits = Limits(
        max_rows=max_rows, max_input_chars=max_input_chars, max_new_tokens=max_new_tokens,
        max_body_bytes=int(max_body_mb * 2**20),
    )
    console.print(f"serving {len(runs)} tasks on http://{host}:{port}/ (page at /, API under /v1)")
    try:
        uvicorn.run(create_app(bank, scheduler, limits=limits, token=token), host=host, port=port, log_level="warning")
    finally:
        scheduler.stop()


@app.command()
def compare(
    task: Annotated[Path, typer.Argument(help="task file (YAML)")],
    out: Annotated[Path, typer.Option(help="report folder (re-running it skips finished cells)")],
    methods: Annotated[str, typer.Option(help="comma-separated: " + ",".join(METHODS))] = "zero-shot,calibrated,few-shot,prompt,lora",
    shots: Annotated[str, typer.Option(help="training rows per label, comma-separated; 'all' for the whole training set")] = "16,all",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds of the final cells")] = "0,1,2",
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps of every trained method (default: the task's)")] = None,
    test: Annotated[Optional[Path], typer.Option(help="rows to report (default: the task's data.test, else its dev file)")] = None,
    budget: Annotated[Optional[str], typer.Option(help="wall time for the whole grid, e.g. 90m or 2h; cells beyond it are reported as over budget")] = None,
    lrs: Annotated[Optional[list[str]], typer.Option("--lrs", help="METHOD=LR,LR,... learning rates to search (repeatable; default: each method's grid)")] = None,
    model: Annotated[Optional[str], typer.Option(help="override the task's model")] = None,
    eval_limit: Annotated[Optional[int], typer.Option(help="validation rows at most (a seeded, label-stratified sample)")] = None,
    report_limit: Annotated[Optional[int], typer.Option(help="report on at most N of the test rows (a seeded, label-stratified sample)")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="cells run at once, each in its own process with an equal share of the cores (their output goes to cells/ID.log)")] = 1,
) -> None:
    """Run methods side by side on the same split, model, loss and steps; write report.md,
    report.html and report.json (dev metric, parameters, artifact size, time, memory, lr chosen)."""
    from .compare.grid import Plan, parse_budget, run_compare
    from .compare.report import console_table, write_report

    try:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        for name in names:
            if name not in METHODS:
                raise MethodError(f"--methods: unknown method {name!r}; use {', '.join(METHODS)}")
        spec = load_task(task)
        grids = {}
        for item in lrs or []:
            name, _, values = item.partition("=")
            grids[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
        test_rows = test or (spec.path(spec.data.test) if spec.data.test else None)
        plan = Plan(
            task=task, out=out, methods=names, shots=[s.strip() for s in shots.split(",")],
            seeds=[int(s) for s in seeds.split(",")], steps=steps or spec.train.steps or 300,
            test=test_rows, budget_s=parse_budget(budget), model=model, lrs=grids,
            extra=tuple(f"--{flag}={value}" for flag, value in (("eval-limit", eval_limit), ("report-limit", report_limit)) if value),
            jobs=jobs,
        )
        records, meta = run_compare(plan, console)
    except (*USER_ERRORS, ValueError) as err:
        _fail(err)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted; run the same command again to continue ({out}/cells holds what finished)")
        raise typer.Exit(130) from None
    rows = write_report(out, records, meta)
    Console().print(console_table(rows, meta))
    console.print(
        f"wall time of this run: {meta['this_run_seconds']:.0f}s with {jobs} job{'s' if jobs > 1 else ''} "
        f"(the cells' own time: {meta['wall_seconds']:.0f}s)"
    )
    console.print(f"report written to {out}/report.md, report.html and report.json")


@app.command("model")
def model_info(
    model: Annotated[
        str, typer.Option(help="'default' (gemma3-270m), 'smollm2-135m', a model folder, a hub id or a .gguf file")
    ] = "default",
) -> None:
    """Load a model once (a GGUF is dequantized and cached) and print what it is."""
    try:
        backbone = Backbone.load(model)
    except USER_ERRORS as err:
        _fail(err)
    params = sum(p.numel() for p in backbone.model.parameters())
    Console().print(
        f"{model}: {type(backbone.model).__name__}, {params / 1e6:.1f}M parameters, hidden {backbone.hidden_size}, "
        f"vocabulary {backbone.vocab_size}, {backbone.dtype} on {backbone.device}; "
        f"fingerprint {backbone.fingerprint}; loaded in {backbone.load_seconds:.1f}s"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
