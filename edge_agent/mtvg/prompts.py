"""MTVG's prompt generator at fedfleet's scale: a parser from a free-form sequence of events to conditions.

MTVG uses an LLM to turn a user's story into one prompt per clip. The toy video model's "prompt" is a
condition (digit class, motion direction), so a small grammar does the job with no LLM:

    "3 right; 3 down; 5 down"
    "3 moving right, then 3 down and then five going up"
    "7 left, then down"            (a segment without a digit keeps the previous segment's digit)

Segments are separated by ';', ',', newlines, 'then' or 'and then'. In a segment, a digit is `0`-`9` or its
English name, a direction is right/left/down/up (also rightward(s), leftward(s), downward(s), upward(s)),
and a few filler words (moving, goes, to, the, digit, ...) are allowed. Anything else, an empty prompt, a
segment without a direction (or with two digits or two directions), or more than `MAX_SEGMENTS` segments is a
`ConfigError` whose one line names the bad token. The coordinator and the agent share this parser.
"""

from __future__ import annotations

import re

import numpy as np

from fedfleet.edge_agent.errors import ConfigError
from fedfleet.edge_agent.nn.video_denoiser import DIRECTIONS, condition_id

MAX_SEGMENTS = 16
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTION_WORDS = {d + suffix: i for i, d in enumerate(DIRECTIONS) for suffix in ("", "ward", "wards")}
DIRECTION_WORDS.update({"rightwards": 0, "leftwards": 1, "downwards": 2, "upwards": 3})
FILLER = frozenset({"moving", "moves", "move", "goes", "going", "go", "to", "the", "a", "an", "digit", "number",
                    "is", "heading", "heads", "towards", "toward", "and", "slides", "sliding", "then"})
_SEPARATORS = re.compile(r"[;,\n]|\band then\b|\bthen\b", re.IGNORECASE)


def parse_prompts(text: str, *, max_segments: int = MAX_SEGMENTS, what: str = "--prompts") -> np.ndarray:
    """Condition ids (digit * 4 + direction), one per segment, int64 (K,)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{what}: the prompt is empty; give segments such as '3 right; 3 down; 5 down'")
    pieces = [p.strip() for p in _SEPARATORS.split(text)]
    segments = [p for p in pieces if p]
    if not segments:
        raise ConfigError(f"{what}: the prompt {text!r} names no segment; give segments such as '3 right; 3 down'")
    if len(segments) > max_segments:
        raise ConfigError(f"{what}: {len(segments)} segments, more than the cap of {max_segments} "
                          f"(the first one past it is {segments[max_segments]!r})")
    conditions: list[int] = []
    digit_before: int | None = None
    for k, segment in enumerate(segments, start=1):
        digit, direction = _segment(segment, k, what)
        if digit is None:
            if digit_before is None:
                raise ConfigError(f"{what}: segment {k} {segment!r} has no digit (0-9) and there is no earlier one")
            digit = digit_before
        if direction is None:
            raise ConfigError(f"{what}: segment {k} {segment!r} has no direction; use one of {', '.join(DIRECTIONS)}")
        conditions.append(int(condition_id(digit, direction)))
        digit_before = digit
    return np.asarray(conditions, np.int64)


def _segment(segment: str, k: int, what: str) -> tuple[int | None, int | None]:
    digit: int | None = None
    direction: int | None = None
    for token in re.findall(r"[^\s]+", segment.lower()):
        word = token.strip(".!?:'\"()")
        if not word:
            continue
        if (word.isascii() and word.isdigit()) or word in WORDS:  # '³' is a digit to str.isdigit, not to int()
            value = int(word) if word.isdigit() else WORDS.index(word)
            if not 0 <= value <= 9 or (word.isdigit() and len(word) > 1):
                raise ConfigError(f"{what}: unknown class {token!r} in segment {k} {segment!r}; digits are 0-9")
            if digit is not None:
                raise ConfigError(f"{what}: segment {k} {segment!r} names two digits (the second is {token!r}); "
                                  "separate segments with ';'")
            digit = value
        elif word in DIRECTION_WORDS:
            if direction is not None:
                raise ConfigError(f"{what}: segment {k} {segment!r} names two directions (the second is {token!r}); "
                                  "separate segments with ';'")
            direction = DIRECTION_WORDS[word]
        elif word not in FILLER:
            raise ConfigError(f"{what}: unknown token {token!r} in segment {k} {segment!r}; use a digit 0-9 and "
                              f"one of {', '.join(DIRECTIONS)}")
    return digit, direction


def describe(cond: int) -> str:
    """'3 right' for a condition id."""
    return f"{int(cond) // len(DIRECTIONS)} {DIRECTIONS[int(cond) % len(DIRECTIONS)]}"
