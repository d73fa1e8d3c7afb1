"""Build a tiny Llama model directory locally: nothing is downloaded.

vLLM needs a real model directory (config, weights, tokenizer, chat template); this makes one
of about 4 MB from nothing:

- a byte-level BPE tokenizer trained with ``tokenizers`` on a small built-in corpus
  (vocabulary 1024; special tokens ``<s>``, ``</s>``, ``<|im_start|>``, ``<|im_end|>``; a
  post-processor that prepends ``<s>``, so *completions* get a BOS token from the tokenizer and
  *chat* gets it from the template only: that tells apart vLLM's two tokenization paths);
- a ChatML-style chat template (``add_generation_prompt`` opens an assistant turn; tools,
  names and tool calls are rendered as JSON);
- a 2-layer ``LlamaForCausalLM`` (hidden 128, 2 heads of 64, float32) with random weights from
  a fixed seed, saved with ``save_pretrained`` (safetensors).

The tests run this file with the vLLM environment's interpreter (it has torch, transformers
and tokenizers) as ``python tiny_model.py OUT_DIR``; `ensure_tiny_model` (imported from the
project's interpreter, which lacks them) caches the result under the cache root, keyed by a
content hash of this file, so a change to the recipe builds a new model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VOCAB_SIZE = 1024
SEED = 1234
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
MARKER = ".prefix-router-ready.json"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|im_start|>tools\\n' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] }}"
    "{% if message.name is defined %}{{ ' ' + message.name }}{% endif %}"
    "{{ '\\n' + message['content'] }}"
    "{% if message.tool_calls is defined %}{{ message.tool_calls | tojson }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML-like; renders tools, names and tool calls (with ``tojson``) so the tests can check
that the router hands the template the same values vLLM does."""

CORPUS = [
    "The router sends each request to the worker whose cache already holds its prefix.",
    "A key-value cache keeps the attention keys and values of tokens seen before.",
    "Prefix caching reuses blocks of sixteen or thirty-two tokens across requests.",
    "You are a helpful assistant. Answer briefly and precisely.",
    "What is the capital of France? The capital of France is Paris.",
    "Tenants are isolated with a salt that changes the hash of the first block.",
    "def add(a, b):\n    return a + b\n",
    "SELECT name, count(*) FROM requests GROUP BY name ORDER BY 2 DESC;",
    "Bounded loads keep any worker below the cap while respecting affinity.",
    "Once upon a time, a small model answered questions about caches and routers.",
    "0123456789 +-*/=()[]{}<>.,;:!?'\"@#$%^&_~|\\ 3.14159 2.71828 42",
    "Les routeurs, les caches et les modèles: ça marche très bien. Grüße! ¿Qué tal?",
]


def _corpus() -> list[str]:
    # Repetition with small variations gives BPE enough pair counts to learn merges.
    lines = []
    for round_ in range(40):
        for index, line in enumerate(CORPUS):
            lines.append(f"{line} ({round_}-{index})")
            lines.append(line.lower())
    return lines


def build_tokenizer(out: Path) -> tuple[int, int, int, int]:
    """Train and save the tokenizer (needs tokenizers and transformers, not torch).

    Returns (vocabulary size, bos, eos, pad ids).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    ids = (tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    return (tokenizer.get_vocab_size(), *ids)  # type: ignore[return-value]


def build(out: Path) -> None:
    """Write the tokenizer and model into ``out`` (runs in the vLLM environment)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, bos, eos, pad = build_tokenizer(out)
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def recipe_hash() -> str:
    """Content hash of this recipe: a new one means a new model directory."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def ensure_tiny_model(cache_root: Path, python: Path, *, tokenizer_only: bool = False) -> Path:
    """The cached model directory, built first with ``python`` (the vLLM env's) if needed.

    ``tokenizer_only`` builds just the tokenizer files (any interpreter with tokenizers and
    transformers will do: the router's exact-mode tests need no weights).
    """
    kind = "tiny-tokenizer" if tokenizer_only else "tiny-llama"
    out = cache_root / f"{kind}-{recipe_hash()}"
    if (out / MARKER).exists():
        return out
    # A private scratch dir, renamed into place when complete: concurrent builders never
    # see each other's half-written files, and a crash leaves no marker behind.
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mode = ["--tokenizer-only"] if tokenizer_only else []
    done = subprocess.run(
        [str(python), str(Path(__file__).resolve()), *mode, str(tmp)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the tiny model failed:\n{done.stderr[-4000:]}")
    (tmp / MARKER).write_text(json.dumps({"recipe": recipe_hash()}), encoding="utf-8")
    try:
        tmp.rename(out)
    except OSError:  # another builder finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / MARKER).exists():
            raise
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--tokenizer-only":
        build_tokenizer(Path(sys.argv[2]))
    else:
        build(Path(sys.argv[1]))
