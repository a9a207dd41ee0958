"""Tiny models for tests and benchmarks (a LLaVA captioner, an open_clip CLIP, CLIP
embedding heads), built offline and saved with the real `save_pretrained` code paths
so the stages load them exactly as they load real checkpoints. Test and benchmark
aid, not product code; synthetic images are in `pipelines/testing/images.py`."""

from __future__ import annotations


# --------------------------------------------------------------------------- #
# Tiny LLaVA (recaption tests and benchmark).

TINY_LLAVA_WORDS = (
    "a an the of on in with and is are at by near under two three small large "
    "cat dog bird horse man woman child tree sky grass car house road water field beach city "
    "red blue green white black brown yellow photo picture image painting drawing "
    "sitting standing running lying playing flying parked sunny cloudy "
    "describe this one sentence short caption what"
).split()
TINY_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_tiny_llava(
    path, *, constant_token: str | None = None, chat_template: bool = True, image_size: int = 32, seed: int = 0
):
    """Write a tiny random LLaVA checkpoint and its processor to `path`, laid out
    as `save_pretrained` writes a real one (config.json, model.safetensors,
    generation_config.json, tokenizer.json, processor_config.json, and
    chat_template.jinja when `chat_template`), so tests load it back through
    `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained`.

    The model: CLIP-vision (2 layers, hidden 16, `image_size` px images in 8 px
    patches) + a 2-layer Llama (hidden 32) over a ~90-word lower-cased
    WordLevel vocabulary with `<image>`, `<s>`, `</s>`, `<pad>`, `<unk>`.
    Random weights generate random words.

    constant_token: make greedy decoding emit this token at every step (e.g.
        "</s>" for empty outputs, "cat" for a loop): it gets id 0 and the final
        norm of the language model is zeroed, so all logits tie at 0 and argmax
        picks the first index.
    """
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    path = Path(path)
    tokens = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "user", "assistant", ":", ".", ","]
    tokens += [w for w in TINY_LLAVA_WORDS if w not in tokens]
    if constant_token is not None:
        if constant_token not in tokens:
            raise ValueError(f"constant_token {constant_token!r} is not in the tiny vocabulary")
        tokens.remove(constant_token)
        tokens.insert(0, constant_token)
    vocab = {token: i for i, token in enumerate(tokens)}

    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    patch_size = 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=TINY_LLAVA_CHAT_TEMPLATE if chat_template else None,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
        image_seq_length=(image_size // patch_size) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if constant_token is not None:
        with torch.no_grad():
            model.model.language_model.norm.weight.zero_()
    model.generation_config.bos_token_id = vocab["<s>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- #
# Tiny open_clip CLIP and embedding heads (scoring tests and benchmark).

TINY_CLIP_NAME = "imagemill-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    # open_clip's bundled BPE tokenizer has 49408 tokens and pads to 77.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(directory, *, seed: int = 0, fmt: str = "safetensors"):
    """Write a tiny random open_clip model: its architecture config
    `DIR/imagemill-tiny-clip.json` (register it with `open_clip.add_model_config`;
    the file stem is the model name) and its weights `DIR/tiny_clip.<fmt>`
    (`safetensors`, or `pt` via torch.save of the state dict). Loads back with
    `open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=<weights>)`.
    Returns (config_path, weights_path)."""
    import json
    from pathlib import Path

    import open_clip
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{TINY_CLIP_NAME}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME)
    weights = directory / f"tiny_clip.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), weights)
    else:
        torch.save(model.state_dict(), weights)
    return config_path, weights


def save_embedding_head(path, sizes, *, seed: int = 0, layout: str = "layers", bias: float | None = None):
    """Write a random head of linear layers `sizes[0] -> sizes[1] -> ...`.

    layout `layers`: tensors `layers.<2i>.weight/bias` (LAION's MLP numbering,
    with gaps where its dropout layers sit); `linear`: a single `weight`/`bias`
    (LAION's linear aesthetic heads; needs len(sizes) == 2). The format follows
    the suffix: `.safetensors` or `.pt`/`.pth` (torch.save). `bias`, when given,
    sets every bias of the last layer. Returns the state dict written."""
    from pathlib import Path

    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    pairs = list(zip(sizes, sizes[1:]))
    for i, (n_in, n_out) in enumerate(pairs):
        prefix = "" if layout == "linear" else f"layers.{2 * i}."
        state[f"{prefix}weight"] = torch.randn(n_out, n_in, generator=generator) / n_in**0.5
        state[f"{prefix}bias"] = torch.randn(n_out, generator=generator) * 0.1
        if bias is not None and i == len(pairs) - 1:
            state[f"{prefix}bias"].fill_(bias)
    if layout == "linear" and len(pairs) != 1:
        raise ValueError("the linear layout holds exactly one layer")
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return state
