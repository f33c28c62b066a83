"""A tiny, randomly initialised LLaVA-shaped vision-language model saved as a local directory.

No VLM can be downloaded here: tests exercise the yes/no VLM judge (`cul.vlm_judge`) on this
miniature, which loads through the same `AutoModelForImageTextToText` / `AutoProcessor` as
Qwen2.5-VL or a real LLaVA. Its answers are arbitrary; its plumbing is the real thing.
"""

from __future__ import annotations

from pathlib import Path

# prompts as a chat template renders them: the image's tokens, the question, then the answer's turn
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"
)


def _tokenizer():
    """Characters, plus whole-word "yes" and "no" (the answers read) and the image placeholder."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4, "yes": 5, "no": 6}
    for i in range(32, 127):
        vocab.setdefault(chr(i), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("yes|no|."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )


def build_tiny_vlm(path: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Build and save a tiny LLaVA (CLIP vision tower, Llama text model; about 0.1M parameters)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = _tokenizer()
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=image_size, patch_size=8, **tower),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), max_position_embeddings=256, **tower),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    LlavaForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    side = {"height": image_size, "width": image_size}
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=side),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(path)
    return path
