"""When one request stops, and what text its client sees: stop token ids, stop strings, max_new_tokens, streaming.

`StopChecker` is fed the request's generated token ids one at a time. It owns the request's incremental decoder
(`Tokenizer.stream`), so the text it checks is exactly the text the client receives, whole characters only (a
character split over several byte-level tokens is held by the decoder until it is complete).

Design
- A stop token id (the tokenizer's end-of-turn ids unless `ignore_eos`, plus `stop_token_ids`) ends the request
  before it is decoded: its text never reaches the output. `stop_reason` reports the id.
- A stop string ends the request as soon as it is complete in the decoded text, wherever the token boundaries
  fall; the output ends right before it, and whatever was decoded after it is dropped. `stop_reason` reports it.
  With several stop strings, the one that completes first in the text wins (on a tie, the longer one). It is the
  only rule a streaming server can keep: the moment a stop string is complete it must stop, whatever a longer
  overlapping stop string that started earlier might have done. It also makes the result independent of how the
  text was cut into tokens. (vLLM instead takes the first string of the `stop` list that occurs.)
- Holdback: the longest end of the not-yet-emitted text that is the beginning of some stop string is held back
  until the next pieces either complete the stop string (then it is dropped) or rule it out (then it is released).
  A streaming client therefore never sees part of a stop string, and the pieces `add` returns, joined, are exactly
  the final `text`. Only the held text needs searching: any stop string that completes later starts inside it
  (otherwise a longer end of the text would begin a stop string, and that end would have been held).
- Finish reasons as in OpenAI's API: "stop" (stop token or string), "length" (`max_new_tokens` tokens generated, or
  the engine calls `finish` because the context is full). A stop string completed by the last allowed token is
  "stop", as in vLLM, which checks stop conditions before the length limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from herd.infer.sampling import SamplingParams
from herd.tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]


class StopChecker:
    """Stop conditions and streamed text of one request.

        checker = StopChecker(params, tokenizer)
        for each new token id: delta = checker.add(token_id); send delta if non-empty; break if checker.finished

    `eos_ids` defaults to `tokenizer.stop_ids`. `skip_special` drops the text of special tokens that are not stop
    tokens (vLLM's `skip_special_tokens`, on by default there too), except `params.keep_special`.
    """

    def __init__(self, params: SamplingParams, tokenizer: Tokenizer, eos_ids: Iterable[int] | None = None,
                 skip_special: bool = True):
        self.params = params
        eos = set() if params.ignore_eos else set(tokenizer.stop_ids if eos_ids is None else eos_ids)
        self.stop_ids = eos | set(params.stop_token_ids)
        self._stops = tuple(params.stop)
        self._decoder = tokenizer.stream(skip_special, keep=params.keep_special)
        self._held = ""  # decoded text not yet emitted: its end may begin a stop string
        self._emitted: list[str] = []
        self.n_tokens = 0  # generated tokens fed so far, the stop token included (what usage counts)
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended the request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The text emitted so far; once finished, the request's final text."""
        return "".join(self._emitted)

    def add(self, token_id: int) -> str:
        """Feed the next generated token; return the text that is now safe to stream (often "")."""
        if self.finished:
            raise RuntimeError(f"request already finished ({self.finish_reason}); no more tokens may be added")
        self.n_tokens += 1
        if token_id in self.stop_ids:
            return self._end("stop", token_id)
        out = self._push(self._decoder.put(token_id))
        if not self.finished and self.n_tokens >= self.params.max_new_tokens:
            out += self._end("length", None)
        return out

    def finish(self, reason: FinishReason = "length") -> str:
        """End the request from outside (the context window is full): release all held text and return it."""
        return "" if self.finished else self._end(reason, None)

    # ---- internals --------------------------------------------------------------------------------------------
    def _end(self, reason: FinishReason, stop_reason: int | None) -> str:
        # The decoder may still hold the bytes of an unfinished character (flushed as U+FFFD, as `decode` does);
        # that last piece can itself complete a stop string, which then takes precedence.
        out = self._push(self._decoder.flush())
        if self.finished:
            return out
        out += self._emit(self._held)
        self._held = ""
        self.finish_reason, self.stop_reason = reason, stop_reason
        return out

    def _push(self, piece: str) -> str:
        """Add decoded text; stop on a complete stop string, else emit all but the held-back end."""
        buf = self._held + piece
        hit = self._first_stop(buf)
        if hit is not None:
            start, s = hit
            self._held = ""
            self.finish_reason, self.stop_reason = "stop", s
            return self._emit(buf[:start])
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep:]
        return self._emit(buf[:len(buf) - keep])

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        """(start, string) of the stop string that completes first in buf; on a tie in end, the longer one."""
        best: tuple[int, int, str] | None = None  # (end, start, string): the smallest end, then the smallest start
        for s in self._stops:
            i = buf.find(s)  # a string's first occurrence is also where it first completes
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _partial(self, buf: str) -> int:
        """Length of the longest end of buf that is a proper beginning of some stop string."""
        longest = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text
