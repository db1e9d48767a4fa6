"""Text as it is generated: token ids -> text pieces (IncrementalDecoder), and text pieces ->
what may be shown, cut at the first stop string (StopMatcher). generation.generate's
generate() and the server's choices (serve/stream.py) both run on these two.

    decoder, stops = IncrementalDecoder(tokenizer), StopMatcher(["\\n\\n", "User:"])
    for token in tokens:
        delta, hit = stops.feed(decoder.add(token))
        show(delta)
        if hit:
            break
    delta, _ = stops.feed(decoder.flush(), final=True)     # the end (EOS, length)
"""

from __future__ import annotations


class IncrementalDecoder:
    """Streaming detokenization: feed ids one at a time, get the new text, never half a UTF-8
    character (a byte-fallback or byte-level token may hold part of one) and with the spaces a
    whole-sequence decode would give (SentencePiece strips a leading space per decode call)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids before this are settled context
        self.read_offset = 0  # text of ids[prefix_offset:read_offset] was already emitted

    WAIT = 8  # pending tokens after which a trailing U+FFFD is settled up to the last few tokens

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset:], self.skip)
        if full.endswith("\ufffd") and len(self.ids) - self.read_offset >= self.WAIT:
            return self._settle(prefix, full)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def _settle(self, prefix: str, full: str) -> str:
        """Invalid bytes that never complete (a run of lone continuation bytes) would otherwise be
        waited on forever, every token re-decoding the whole run. A character still incomplete
        began in the last 3 tokens (UTF-8 has at most 4 bytes, a token at least 1), so the text
        before a cut a few tokens back is final where it agrees with the whole decode: emit it
        and cut there, keeping the window short."""
        n = len(self.ids)
        for cut in range(n - 3, max(self.read_offset, n - 7), -1):
            head = self.tokenizer.decode(self.ids[self.prefix_offset:cut], self.skip)
            if len(head) > len(prefix) and full.startswith(head):
                self.prefix_offset, self.read_offset = self.read_offset, cut
                return head[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes to U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


class StopMatcher:
    """Stop strings matched across text pieces (a stop string may span several tokens).

    feed(piece) -> (delta, hit): `delta` is the text that is safe to show now, `hit` whether a
    stop string has matched. The text is cut where the earliest stop string begins, the stop
    string itself never shown. Until the end, the last len(longest stop) - 1 characters are held
    back, as they may still begin a stop string; feed(piece, final=True) (no text will follow)
    releases them. After a hit everything further is ignored. `text` is all the kept text.
    """

    def __init__(self, stop_strings=()):
        stop = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or ())
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self.stop = stop
        self.hold = max(map(len, stop), default=1) - 1  # a tail this long may still become a stop string
        self.text = ""
        self.sent = 0  # characters of text already returned as deltas
        self.hit = False
        self.matched: str | None = None  # the stop string that matched

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        if not self.hit:
            before = len(self.text)
            self.text += piece
            at = self._find(max(0, before - self.hold))
            if at is not None:
                self.text, self.hit = self.text[:at], True
        done = self.hit or final
        ready = len(self.text) if done else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:ready], max(self.sent, ready)
        return delta, self.hit

    def _find(self, start: int) -> int | None:
        """Where the earliest stop string begins at or after `start` (earlier text was checked:
        a stop string that began before it would have ended inside the text already searched)."""
        found = [(i, n, s) for n, s in enumerate(self.stop) if (i := self.text.find(s, start)) != -1]
        if not found:
            return None
        at, _, self.matched = min(found)  # the earliest; at a tie, the one listed first
        return at
