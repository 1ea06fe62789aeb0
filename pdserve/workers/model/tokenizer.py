"""Tokenizers behind one small interface: a byte-level one for `tiny`, Hugging Face's for real models."""
from __future__ import annotations

from typing import Any, Protocol


class Tokenizer(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; a few special tokens follow."""

    BOS_ID = 256
    EOS_ID = 257
    # Rounded up to a multiple of 64 so the embedding matrix has a friendly shape.
    VOCAB_SIZE = 320

    eos_token_ids = (EOS_ID,)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.BOS_ID, *ids] if add_bos else ids

    def decode(self, token_ids: list[int]) -> str:
        data = bytes(t for t in token_ids if t < 256)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return self.encode(text)


class HFTokenizer:
    """Wraps a `transformers` tokenizer, including its chat template."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: tuple[int, ...]):
        self._tok = hf_tokenizer
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_bos))

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        out = self._tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
