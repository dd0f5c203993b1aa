"""Incremental detokenization and stop strings for one sequence.

Text is produced by decoding a short window of tokens and emitting only what
the newest token added, so the cost per token is constant. A window whose
text ends in U+FFFD is an unfinished multi-byte character: nothing is emitted
until the next token completes it. With stop strings, the last
``max(len(stop)) - 1`` characters are held back until it is known that they
do not begin a stop string, and the stop string itself is never emitted.
"""

from __future__ import annotations

# Tokens of prompt context decoded with the output, so that tokenizers that
# encode a leading space into a token (sentencepiece) render it correctly.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""          # all text decoded so far (stop string not included once found)
        self._emitted = 0       # characters of self.text already returned
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Feed one generated token; return newly safe text (maybe empty).

        After a stop string is found, :attr:`stopped_by` is set and the text is
        cut just before it.
        """
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            if self.stop:
                self._check_stop(len(full) - len(prefix))
        return self._take(final=self.stopped_by is not None)

    def skip_token(self, token_id: int) -> None:
        """Account for a token whose text was already emitted elsewhere (a KV import)."""
        self.add_token(token_id)
        self._emitted = len(self.text)

    def mark_emitted(self, num_chars: int) -> None:
        """Say that the first ``num_chars`` characters were already streamed."""
        self._emitted = min(num_chars, len(self.text))

    def flush(self) -> str:
        """The held-back text, at the end of generation."""
        return self._take(final=True)

    def _check_stop(self, added: int) -> None:
        window_start = max(0, len(self.text) - added - self._holdback)
        hits = [(self.text.find(s, window_start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i]
            self.stopped_by = s

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._holdback)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out
