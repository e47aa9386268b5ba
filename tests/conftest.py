"""Shared fixtures: tiny randomly initialised models with a byte-level BPE tokenizer, saved as
ordinary Hugging Face model folders, so unit tests exercise the real loading path without a download.

The tiny Llama stands for the default model (SmolLM2: no BOS token). The tiny Gemma 3 stands for the
second real model: it adds a BOS token, scales its input embeddings, and mixes full-attention layers
with sliding-window layers whose window (6 tokens) is far shorter than the test prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    "Review: a great film, lovely and moving. Sentiment: positive",
    "Review: a dull, boring mess. Sentiment: negative",
    "O serviço foi lento, mas a comida estava excelente. positivo negativo neutro",
    "def add(a, b): return a + b  # code summary translate JavaScript function",
    "Preciso marcar um horário com o gerente para amanhã. agendar cancelar verificar status pedido",
] * 20


def _tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
IDS = dict(max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)


def _save(folder: Path, model, tokenizer: Tokenizer, **special) -> Path:
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", **special).save_pretrained(
        folder
    )
    return folder


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), num_hidden_layers=2, bos_token_id=None, **SIZES, **IDS)
    return _save(folder, LlamaForCausalLM(config), tokenizer)


def build_tiny_gemma(folder: Path, seed: int = 0) -> Path:
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=tokenizer.get_vocab_size(),
        num_hidden_layers=3,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=2,
        **SIZES,
        **IDS,
    )
    return _save(folder, Gemma3ForCausalLM(config), tokenizer, bos_token="<bos>", add_bos_token=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir: Path):
    from softprompt.backbone import Backbone

    return Backbone.load(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory):
    from softprompt.backbone import Backbone

    return Backbone.load(str(build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))), device="cpu")


@pytest.fixture(params=["llama", "gemma"])
def any_backbone(request: pytest.FixtureRequest):
    """Each tiny backbone in turn: a test using it must hold for both architectures."""
    return request.getfixturevalue("tiny_backbone" if request.param == "llama" else "tiny_gemma")
