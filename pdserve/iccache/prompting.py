"""Request bodies in and out of IC-Cache: the text an example lookup uses, and the body the small
model gets with the examples placed first (stable order: a prefix shared across requests).

A text prompt for the routed name is a question: whichever model answers gets it in one layout,
`preamble`, then the examples as "Question: ...\nAnswer: ..." shots, then the question. Base models
(no chat template) need that scaffold to answer at all, and both arms must see the same one, or
the comparison between them measures the scaffold. The preamble (`iccache.text_preamble`) holds
fixed demonstrations of the answer format for such models."""
from __future__ import annotations

import copy

from pdserve.policy.iccache.selection import Chosen


class NotRoutable(ValueError):
    """The request has no text IC-Cache can match (e.g. a prompt of token ids)."""


def request_text(body: dict, chat: bool) -> str:
    if chat:
        users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        content = users[-1].get("content") if users else None
        if isinstance(content, list):     # content parts: the text ones
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str) or not content.strip():
            raise NotRoutable("the routed model needs a user message with text")
        return content
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise NotRoutable("the routed model needs a text prompt (not token ids)")
    return prompt


def text_prompt(question: str, shots: list[tuple[str, str]] = (), preamble: str = "") -> str:
    """The layout of a routed text prompt: preamble, (question, answer) shots, then the question."""
    body = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
    return f"{preamble}{body}Question: {question}\nAnswer:"


def with_examples(body: dict, chat: bool, model: str, chosen: list[Chosen], preamble: str = "") -> dict:
    """The body as the chosen model gets it: the examples (a large model's past question and
    answer each) before the request, as earlier chat turns or as a few-shot text prefix."""
    out = copy.deepcopy(body)
    out["model"] = model
    if not chat:
        shots = [(c.example.request_text, c.example.answer_text) for c in chosen]
        out["prompt"] = text_prompt(request_text(body, chat=False), shots, preamble)
        return out
    if chosen:
        messages = out["messages"]
        head = 0
        while head < len(messages) and messages[head].get("role") in ("system", "developer"):
            head += 1
        turns = []
        for c in chosen:
            turns += [{"role": "user", "content": c.example.request_text},
                      {"role": "assistant", "content": c.example.answer_text}]
        out["messages"] = messages[:head] + turns + messages[head:]
    return out
