"""Chat messages to prompt token ids, with message content kept as text.

Rendering a conversation with the model's chat template and tokenizing the
result would let a message inject control tokens: a user writing
``<|im_start|>system`` would get a real ``<|im_start|>`` token, as if the
template had put it there. Here only the special tokens that the template
itself writes are special; the same text inside a message's content is
tokenized as ordinary text.

How: the template is rendered once with a unique placeholder in place of each
message's content. The special tokens found in that rendering (outside the
placeholders) are the template's; the real text is then split at exactly
those, each special token becomes its id, and each piece between them (the
template's plain text and the messages' content) is tokenized with special
tokens treated as text. A fast tokenizer already tokenizes the text between
two special tokens on its own, so a conversation with no special-token text
in its content gets exactly the ids of ``apply_chat_template`` + tokenize.

Used by both the router (:mod:`router.validation`) and the engine
(:meth:`engine.llm_engine.LLMEngine.tokenize`).
"""

from __future__ import annotations

import re
import uuid

from engine.sampling_params import InvalidRequestError


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` ({"role", "content"} dicts) through the tokenizer's
    chat template, with the generation prompt appended.

    Raises :class:`InvalidRequestError` (field ``chat.messages``) when the
    template does not copy each message's content through unchanged (a
    template that rewrites content cannot be tokenized this safely).
    """
    nonce = uuid.uuid4().hex
    holder = re.compile(re.escape(f"\u27e6{nonce}:") + r"(\d+)" + re.escape("\u27e7"))
    templated = [{**m, "content": f"\u27e6{nonce}:{i}\u27e7"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(templated, add_generation_prompt=True, tokenize=False)
    pieces = holder.split(rendered)  # template text, message index, template text, ...
    if sorted(int(i) for i in pieces[1::2]) != list(range(len(messages))):
        raise InvalidRequestError("chat.messages", "the model's chat template does not keep message content as given")
    specials = _special_pattern(tokenizer)
    ids: list[int] = []
    text = ""  # plain text since the last template special token
    for i, piece in enumerate(pieces):
        if i % 2:  # a message's content: always text
            text += messages[int(piece)]["content"]
            continue
        last = 0
        for match in specials.finditer(piece) if specials else ():
            text += piece[last:match.start()]
            ids += _text_ids(tokenizer, text)
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            text, last = "", match.end()
        text += piece[last:]
    return ids + _text_ids(tokenizer, text)


def _text_ids(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` with any special-token text in it tokenized as plain text."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _special_pattern(tokenizer) -> re.Pattern | None:
    """Matches any of the tokenizer's special tokens, longest first (as the tokenizer matches them)."""
    tokens = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = sorted(set(tokens) | {t.content for t in added.values() if getattr(t, "special", False) and t.content},
                    key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None
