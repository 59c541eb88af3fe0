"""Tiny models built in-process, for tests, examples and benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on
a few sentences, and the models are randomly initialised ``transformers``
Llama models saved as ordinary Hugging Face folders.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Merging models averages what several fine-tunes learned.",
    "1 + 2 = 3. 4 + 5 = 9. 10 - 3 = 7.",
    "A language model predicts the next token from the ones before it.",
    "for i in range(10):\n    print(i * i)\n",
]

TINY_VOCAB_SIZE = 320


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    """Train a byte-level BPE tokenizer on ``TINY_CORPUS`` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )


def tiny_llama_config(
    num_layers: int = 4,
    hidden_size: int = 32,
    vocab_size: int = TINY_VOCAB_SIZE,
    tie_word_embeddings: bool = False,
    intermediate_size: int | None = None,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
):
    """Return a ``LlamaConfig`` for a model small enough to build in milliseconds."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def make_tiny_llama(
    output_dir: str | Path,
    seed: int = 0,
    *,
    num_layers: int = 4,
    hidden_size: int = 32,
    vocab_size: int = TINY_VOCAB_SIZE,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool = True,
    base_dir: str | Path | None = None,
    noise: float = 0.02,
) -> Path:
    """Save a random tiny Llama model (and tokenizer) to ``output_dir``.

    With ``base_dir`` the model is that saved model plus Gaussian noise of
    standard deviation ``noise``, which gives a family of "fine-tunes" that
    share a base, as the task-vector methods expect.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    output_dir = Path(output_dir)
    generator = torch.Generator().manual_seed(seed)
    if base_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    else:
        torch.manual_seed(seed)
        config = tiny_llama_config(
            num_layers=num_layers,
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            tie_word_embeddings=tie_word_embeddings,
        )
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    model.save_pretrained(output_dir, safe_serialization=True)
    if with_tokenizer:
        build_tiny_tokenizer().save_pretrained(output_dir)
    return output_dir


def make_tiny_family(root: str | Path, count: int = 3, **kwargs) -> list[Path]:
    """Save a base model at ``root/base`` and ``count`` noisy fine-tunes ``root/ft<i>``."""
    root = Path(root)
    base = make_tiny_llama(root / "base", seed=0, **kwargs)
    noise = kwargs.pop("noise", 0.02)
    models = [base]
    for index in range(1, count + 1):
        models.append(make_tiny_llama(root / f"ft{index}", seed=index, base_dir=base, noise=noise))
    return models
