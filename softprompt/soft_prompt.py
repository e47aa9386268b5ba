"""The soft prompt: N trainable vectors in the model's embedding space, and how they start.

Stored as safetensors (one fp32 tensor named `prompt`), never pickle, so a prompt from a stranger
is safe to load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbone import Backbone
from .run import RunInfo, atomic_file

PROMPT_FILE = "prompt.safetensors"
# `vocab` init samples among the first ids of the vocabulary: in BPE vocabularies these are the
# frequent merges, which Lester et al. (2021) found a better start than rare tokens.
VOCAB_INIT_TOP = 5000


class InitError(ValueError):
    """The soft prompt's init spec cannot be used."""


class SoftPrompt(torch.nn.Module):
    """N trainable embedding rows, kept in fp32 whatever dtype the frozen model runs in."""

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        self.vectors = torch.nn.Parameter(vectors.detach().float().clone())

    @property
    def length(self) -> int:
        return self.vectors.shape[0]

    def prefix_kv(self) -> None:
        """A soft prompt enters as input vectors, not as keys and values (see methods/prefix.py)."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved, and what keys a server's prefix cache."""
        return {"prompt": self.vectors.detach().cpu().contiguous()}

    def save(self, folder: str | Path) -> Path:
        """Write prompt.safetensors atomically: a crash leaves the old file or the new, never half."""
        path = Path(folder) / PROMPT_FILE
        with atomic_file(path) as tmp:
            save_file(self.tensors(), str(tmp))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SoftPrompt:
        return cls(load_file(str(Path(folder) / PROMPT_FILE))["prompt"])

    def vocab_norm(self, backbone: Backbone) -> float:
        """Mean norm of the model's token embeddings, the scale to compare soft vectors with."""
        with torch.no_grad():
            return float(_embedding_table(backbone).norm(dim=-1).mean())

    def nearest_tokens(self, backbone: Backbone, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each soft vector, the k vocabulary tokens whose embeddings are closest (cosine)."""
        with torch.no_grad():
            table = backbone.embed(torch.arange(backbone.vocab_size)).float()
            vectors = self.vectors.to(table.device)
            sims = (
                torch.nn.functional.normalize(vectors, dim=-1)
                @ torch.nn.functional.normalize(table, dim=-1).T
            )
            top = sims.topk(k, dim=-1)
        return [
            [(backbone.tokenizer.decode([i]), float(s)) for i, s in zip(ids.tolist(), vals.tolist())]
            for ids, vals in zip(top.indices, top.values)
        ]


def _embedding_table(backbone: Backbone) -> torch.Tensor:
    return backbone.embed(torch.arange(backbone.vocab_size)).detach().float().cpu()


def _vocab_rows(backbone: Backbone, n: int, generator: torch.Generator) -> torch.Tensor:
    top = min(VOCAB_INIT_TOP, backbone.vocab_size)
    ids = torch.randint(0, top, (n,), generator=generator)
    return backbone.embed(ids).detach().float().cpu()


def _token_rows(backbone: Backbone, texts: list[str]) -> list[torch.Tensor]:
    """One vector per text: the mean embedding of its tokens."""
    rows = []
    for text in texts:
        ids = backbone.tokenize(text)
        if ids:
            rows.append(backbone.embed(torch.tensor(ids)).detach().float().cpu().mean(0))
    return rows


def init_prompt(
    spec: str,
    length: int,
    backbone: Backbone,
    label_words: list[str] | None = None,
    seed: int = 0,
    demonstrations: list[str] | None = None,
) -> SoftPrompt:
    """Make the starting prompt.

    random       normal noise with the embedding table's mean and std
    vocab        embeddings of tokens sampled from the frequent part of the vocabulary
    text:"..."   the text's token embeddings, repeated to fill N (as PEFT does)
    labels       the verbalizer's words (Lester et al.'s best init), the rest sampled vocabulary
    demos        the token embeddings of `demonstrations` (rows with their answers, as Context
                 Tuning starts), as many whole ones as fit in N, the rest sampled vocabulary
    from:RUN     another run's trained prompt (same model, same length)
    """
    generator = torch.Generator().manual_seed(seed)
    if spec == "random":
        table = _embedding_table(backbone)
        noise = torch.randn(length, backbone.hidden_size, generator=generator)
        return SoftPrompt(noise * table.std() + table.mean())
    if spec == "vocab":
        return SoftPrompt(_vocab_rows(backbone, length, generator))
    if spec.startswith("text:"):
        text = spec[len("text:") :].strip().strip('"').strip("'")
        ids = backbone.tokenize(text)
        if not ids:
            raise InitError(f"init {spec!r}: the text is empty")
        ids = (ids * (length // len(ids) + 1))[:length]
        return SoftPrompt(backbone.embed(torch.tensor(ids)).detach())
    if spec == "labels":
        rows = _token_rows(backbone, [" " + w.strip() for w in label_words or []])[:length]
        rest = _vocab_rows(backbone, length - len(rows), generator)
        return SoftPrompt(torch.cat([torch.stack(rows), rest]) if rows else rest)
    if spec == "demos":
        if not demonstrations:
            raise InitError("init demos: there are no training rows to render as demonstrations")
        ids = _demonstration_ids(backbone, demonstrations, length)
        rest = _vocab_rows(backbone, length - len(ids), generator)
        return SoftPrompt(torch.cat([backbone.embed(torch.tensor(ids, dtype=torch.long)).detach().float().cpu(), rest]))
    if spec.startswith("from:"):
        return _from_run(spec[len("from:") :], length, backbone)
    raise InitError(f'unknown init {spec!r}: use random, vocab, text:"...", labels, demos or from:RUN')


def _demonstration_ids(backbone: Backbone, demonstrations: list[str], length: int) -> list[int]:
    """Token ids of whole demonstrations, one per line, while they fit in `length`; when not even
    the first fits, its last `length` tokens (where its answer is)."""
    ids: list[int] = []
    for text in demonstrations:
        more = backbone.tokenize(("\n" if ids else "") + text)
        if len(ids) + len(more) > length:
            break
        ids += more
    if not ids and demonstrations:
        ids = backbone.tokenize(demonstrations[0])[-length:]
    return ids


def _from_run(run: str, length: int, backbone: Backbone) -> SoftPrompt:
    info = RunInfo.read(run)
    if info.fingerprint != backbone.fingerprint:
        raise InitError(f"init from:{run}: that prompt was trained on another model ({info.model})")
    prompt = SoftPrompt.load(run)
    if prompt.length != length:
        raise InitError(f"init from:{run}: it has {prompt.length} soft tokens, the template {length}")
    return prompt
