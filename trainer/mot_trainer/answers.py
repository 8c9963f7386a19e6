"""Final-answer extraction and exact-match comparison for math-style chain-of-thought outputs.

Order of preference: the last `\\boxed{..}`, then the last `Answer: ..` line, then the last number.
A generation cut off by the token limit only counts an explicit answer (boxed or `Answer:`): its
last number is most likely an intermediate step, not an answer.
"""

from __future__ import annotations

import re

_ANSWER_LINE = re.compile(r"(?:final\s+)?answer\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` (nested braces balanced), in order."""
    found = []
    start = 0
    while (i := text.find("\\boxed{", start)) != -1:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:  # unbalanced: the text was cut inside the box
            break
        found.append(text[i + len("\\boxed{") : j - 1])
        start = j
    return found


def extract_answer(text: str, *, explicit_only: bool = False) -> str | None:
    """The final answer in `text`, or None. `explicit_only`: only boxed / `Answer:` answers."""
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    lines = _ANSWER_LINE.findall(text)
    if lines:
        answer = lines[-1].strip().rstrip(".").strip()
        if answer:
            return answer
    if explicit_only:
        return None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    """Canonical form for exact match: no spaces, `$`, trailing period or thousands separators;
    numbers without trailing zeros (`68.0` == `68`)."""
    text = answer.strip().strip("$").strip().rstrip(".")
    text = text.replace(" ", "").replace("\\!", "")
    if re.fullmatch(r"-?[\d,]+(?:\.\d+)?", text):
        text = text.replace(",", "")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        if text in ("-0", ""):
            text = "0"
    return text


def is_correct(predicted: str | None, reference: str) -> bool:
    return predicted is not None and normalize(predicted) == normalize(str(reference))
