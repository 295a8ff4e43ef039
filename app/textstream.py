"""Token ids -> display text, one token at a time: correct across multi-byte characters and merged tokens, with
stop strings cut out of the output."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"


class TextStream:
    """Decodes a reply incrementally (the prefix/read-offset window of TGI and vLLM, so each step decodes a few
    tokens, not the whole reply) and holds back text that could still turn into a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        """Decoded so far (including held-back text)."""
        self._emitted = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that may be shown now ('' while a character or a possible stop
        string is incomplete). Once a stop string appears, `stopped` is set and nothing more is returned."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The held-back text, at the end of the reply (a stop-string prefix that never completed)."""
        return "" if self.stopped else self._release(final=True)

    @property
    def output(self) -> str:
        """The reply as the client sees it: up to (not including) the first stop string."""
        return self.text[: self._emitted] if self.stopped else self.text

    def _release(self, final: bool) -> str:
        hit = min(
            (i for i in (self.text.find(s, max(0, self._emitted - len(s))) for s in self._stop) if i >= 0), default=-1
        )
        if hit >= 0:
            self.stopped = True
            end = hit
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        end = max(end, self._emitted)
        new, self._emitted = self.text[self._emitted : end], end
        return new

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
