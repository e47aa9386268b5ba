"""Moving prompts between softprompt and Hugging Face PEFT.

PEFT's prompt tuning always puts its virtual tokens before the whole input, so only templates whose
soft tokens form one group at the very start (`{soft:N} ...`) can be exported. The rest of the
template is plain text the PEFT user formats their input with; we save it beside the adapter
(`softprompt_task.json`, which PEFT ignores) so an import can restore it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbone import Backbone, ModelNotFound, model_name, resolve
from .methods import METHODS, method_class
from .methods.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .run import INFO_FILE, ArtifactError, RunInfo, atomic_file, check_model, write_atomic
from .soft_prompt import SoftPrompt
from .taskfile import TaskSpec
from .template import Template

SIDECAR = "softprompt_task.json"


def _template(info: RunInfo) -> Template:
    return Template.parse(info.template, slot="target" if info.kind == "generation" else "label")


def export_peft(run: str | Path, folder: str | Path, backbone: Backbone) -> Path:
    """Write a PEFT prompt-tuning adapter (config + `prompt_embeddings`) for a run."""
    info = RunInfo.read(run)
    check_model(info, backbone, run)
    if not method_class(info.method).plain_prompt:
        plain = ", ".join(name for name, m in METHODS.items() if m.plain_prompt)
        raise ArtifactError(
            f"{run}: a {info.method!r} run holds no soft prompt; export writes PEFT prompt-tuning adapters "
            f"(runs of {plain})" + (f": a {info.method} run is already a PEFT adapter" if ADAPTER_WEIGHTS in method_class(info.method).files else "")
        )
    template = _template(info)
    soft = [i for i, s in enumerate(template.segments) if s.kind == "soft"]
    if soft != [0]:
        raise ArtifactError(
            f"{run}: template {info.template!r} cannot be expressed in PEFT, which always puts its virtual "
            "tokens before the whole input: export needs one {soft:N} group at the very start"
        )
    if backbone.bos_ids:
        raise ArtifactError(
            f"{run}: model {info.model!r} starts every input with {backbone.tokenizer.decode(backbone.bos_ids)!r}; "
            "softprompt puts the soft tokens after it (where the model expects its input), PEFT puts its "
            "virtual tokens before it, so PEFT would not compute what this prompt was trained for"
        )
    write_adapter(folder, SoftPrompt.load(run), backbone, resolve(info.model).path)
    write_atomic(Path(folder) / SIDECAR, (Path(run) / INFO_FILE).read_text(encoding="utf-8"))
    return Path(folder)


def write_adapter(folder: str | Path, prompt: SoftPrompt, backbone: Backbone, base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained writes them."""
    config = backbone.model.config.get_text_config()
    adapter = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": prompt.length,
        "token_dim": prompt.vectors.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "modules_to_save": None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / ADAPTER_WEIGHTS) as tmp:
        save_file({"prompt_embeddings": prompt.vectors.detach().cpu().contiguous()}, str(tmp))
    write_atomic(folder / ADAPTER_CONFIG, json.dumps(adapter, indent=2))


def import_peft(
    folder: str | Path, out: str | Path, backbone: Backbone, spec: TaskSpec | None = None
) -> RunInfo:
    """Turn a PEFT prompt-tuning adapter into a softprompt run folder on `backbone`.

    The template (and verbalizer or generation settings) come from `spec` when given, else from the
    sidecar an export left; PEFT itself records none. The sidecar's fingerprint must match the
    backbone's; without one, the base model the adapter names is checked where it can be, and the
    result is kept in `base_model_check`."""
    folder, out = Path(folder), Path(out)
    try:
        adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
        vectors = load_file(str(folder / ADAPTER_WEIGHTS))["prompt_embeddings"]
    except (OSError, ValueError, KeyError) as err:
        raise ArtifactError(f"{folder}: not a PEFT prompt-tuning adapter ({err})") from err
    if adapter.get("peft_type") != "PROMPT_TUNING" or adapter.get("num_transformer_submodules", 1) != 1:
        raise ArtifactError(
            f"{folder}: peft_type {adapter.get('peft_type')!r} is not a plain prompt-tuning adapter"
        )
    sidecar = _read_sidecar(folder)
    check = _check_base_model(folder, sidecar, adapter.get("base_model_name_or_path"), backbone)
    if vectors.shape[1] != backbone.hidden_size:
        raise ArtifactError(
            f"{folder}: prompt width {vectors.shape[1]} does not match the model's hidden size {backbone.hidden_size}"
        )
    info = _info_for_import(folder, backbone, spec, sidecar, vectors.shape[0])
    info.base_model_check = check
    out.mkdir(parents=True, exist_ok=True)
    SoftPrompt(vectors.to(torch.float32)).save(out)
    info.write(out)
    return info


def _read_sidecar(folder: Path) -> RunInfo | None:
    """The run description our export leaves beside the adapter, if there is one."""
    path = folder / SIDECAR
    if not path.is_file():
        return None
    try:
        return RunInfo.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ArtifactError(f"{path}: not a valid softprompt run description ({err})") from err


def _check_base_model(folder: Path, sidecar: RunInfo | None, base: str | None, backbone: Backbone) -> str:
    """How the adapter is known to belong to `backbone`: by the sidecar's fingerprint (a different
    one is refused), else by the base model PEFT names being the loaded model's path or name."""
    if sidecar is not None:
        check_model(sidecar, backbone, folder)
        return "fingerprint"
    if not base:
        return "unverified: the adapter names no base model"
    named = Path(base).expanduser()
    if named.exists():
        if named.resolve() in _model_paths(backbone):
            return "same path"
    elif base in (backbone.spec, getattr(backbone.model.config, "name_or_path", None)):
        return "same name"
    return f"unverified: adapter names base model {base!r}"


def _model_paths(backbone: Backbone) -> set[Path]:
    """The folder (and GGUF file) the backbone was loaded from; none for a hub id."""
    try:
        source = resolve(backbone.spec)
    except ModelNotFound:
        return set()
    paths = [Path(source.path)] + ([Path(source.path) / source.gguf_file] if source.gguf_file else [])
    return {path.resolve() for path in paths if path.exists()}


def _info_for_import(
    folder: Path, backbone: Backbone, spec: TaskSpec | None, sidecar: RunInfo | None, length: int
) -> RunInfo:
    if spec is not None:
        generation = spec.kind == "generation"
        info = RunInfo(
            kind=spec.kind,
            model=model_name(backbone.spec),
            fingerprint=backbone.fingerprint,
            template=spec.template,
            verbalizer=None if generation else _verbalizer_words(spec),
            label_column=spec.data.label,
            generation=spec.generation.model_dump() if generation else None,
            target_column=spec.data.target,
            tests_column=spec.data.tests,
            columns=spec.data.columns,
            soft_tokens=length,
            max_length=spec.train.max_length,
            init=f"peft:{folder}",
            training=spec.train.model_dump(),
        )
    elif sidecar is not None:
        info = sidecar
        info.model, info.fingerprint = model_name(backbone.spec), backbone.fingerprint
        info.init, info.metrics = f"peft:{folder}", {}
    else:
        raise ArtifactError(f"{folder}: PEFT records no template; give one with --task TASK.yaml")
    soft = _template(info).soft_tokens
    if soft != length:
        raise ArtifactError(
            f"{folder}: the adapter has {length} virtual tokens but the template {info.template!r} has {soft}"
        )
    return info


def _verbalizer_words(spec: TaskSpec) -> dict[str, list[str]]:
    from .verbalizer import Verbalizer

    if not spec.verbalizer:
        raise ArtifactError("importing a classification prompt needs a verbalizer in the task file")
    return Verbalizer.from_spec(spec.verbalizer).words
