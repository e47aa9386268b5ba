"""Shared fixtures: a tiny randomly initialised Llama with a byte-level BPE tokenizer, saved as an
ordinary Hugging Face model folder, so unit tests exercise the real loading path without a download."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    "Review: a great film, lovely and moving. Sentiment: positive",
    "Review: a dull, boring mess. Sentiment: negative",
    "O serviço foi lento, mas a comida estava excelente. positivo negativo neutro",
    "def add(a, b): return a + b  # code summary translate JavaScript function",
    "Preciso marcar um horário com o gerente para amanhã. agendar cancelar verificar status pedido",
] * 20


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir: Path):
    from softprompt.backbone import Backbone

    return Backbone.load(str(tiny_model_dir), device="cpu")
