"""Answer extraction and grading: one grader per dataset (GSM8K, MATH, organism tasks)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from .record import THINK_END

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# an integer unless it has a fraction ("4." ends); not the digit of a name such as g9
_ORGANISM_NUMBER = re.compile(r"(?<![A-Za-z\d])-?\d+(?:[./]\d+)?")


def canonical_number(s: str) -> str | None:
    """``"1,000" -> "1000"``, ``"3.50" -> "3.5"``, ``"-0" -> "0"``; ``None`` if not a number."""
    s = s.replace(",", "").strip()
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_gsm8k(text: str) -> str | None:
    """The number right after the last ``####``, commas removed and normalised (``3/4`` reads as ``0.75``, a fraction
    without a finite decimal as ``None``); ``None`` if absent."""
    if "####" not in text:
        return None
    m = _NUMBER.match(text.rsplit("####", 1)[1].replace("$", "").lstrip())  # "#### Step 2: ..." is a heading
    if m is None:
        return None
    over = re.match(r"\s*/\s*(\d+)", m.string[m.end() :])
    if over is None:
        return canonical_number(m.group())
    den = int(over.group(1))
    if den == 0:
        return None
    value = Fraction(Decimal(m.group().replace(",", ""))) / den
    rest = value.denominator
    for p in (2, 5):
        while rest % p == 0:
            rest //= p
    return canonical_number(str(Decimal(value.numerator) / Decimal(value.denominator))) if rest == 1 else None


def _box(text: str, start: int) -> tuple[str | None, int]:
    """The content of the box whose command starts at ``start``, and where the box ends (None: cut off)."""
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":  # skip escaped characters such as \{ and \}
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip(), j + 1
            j += 1
        return None, len(text)  # unbalanced: the box was cut off
    if i < len(text) and text[i] == " ":  # "\boxed 5": up to whitespace or "$"
        m = re.match(r"\s*([^\s$]+)", text[i:])
        return (m.group(1), i + m.end()) if m else (None, i)
    return None, i


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces) or ``\\boxed 5``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    return None if start < 0 else _box(text, start)[0]


_BOX = re.compile(r"\\(?:boxed|fbox)")
_BETWEEN_BOXES = re.compile(r"[\s$,;]*(?:(?:and|\\text\{\s*and\s*\})[\s$,;]*)?")  # not "or": alternatives


def extract_boxed_list(text: str) -> str | None:
    """The last box's content, joined (``", "``) with the boxes right before it that only commas, ``and`` or ``$``
    separate from it: ``\\boxed{2}, \\boxed{-3}`` reads ``2, -3`` (a list answer boxed item by item; ``or`` gives
    alternatives, of which the last is read)."""
    boxes = [(m.start(), *_box(text, m.start())) for m in _BOX.finditer(text)]
    if not boxes or boxes[-1][1] is None:
        return None
    parts = [boxes[-1][1]]
    for (_, content, end), (next_start, _, _) in zip(reversed(boxes[:-1]), reversed(boxes[1:])):
        if content is None or not _BETWEEN_BOXES.fullmatch(text[end:next_start]):
            break
        parts.append(content)
    return ", ".join(reversed(parts))


def extract_organism(text: str) -> str | None:
    """The first number after ``</think>`` if present, else the first in ``text``, when it is an integer."""
    if THINK_END in text:
        text = text.split(THINK_END, 1)[1]
    m = _ORGANISM_NUMBER.search(text)
    return str(int(m.group())) if m and m.group().lstrip("-").isdigit() else None


# ---------------------------------------------------------------------------- MATH normalisation

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_WORDS = (
    r"(?:units?|sq(?:uare)?\s*units?|cm|centimeters?|m|meters?|km|inch(?:es)?|in|feet|ft|foot|"
    r"miles?|yards?|degrees?|dollars?|cents?|hours?|minutes?|seconds?|days?|weeks?|years?|"
    r"mph|pounds?|ounces?|grams?|kg|liters?|gallons?)"
)
_TRAILING_UNIT = re.compile(r"\\(?:text|mbox|mathrm)\s*\{\s*" + _UNIT_WORDS + r"\s*\}(\^\{?\d\}?)?$")


def _brace_arg(s: str, i: int) -> tuple[str, int]:
    """The argument starting at ``s[i]``: a ``{...}`` group, a command or a single character."""
    if i < len(s) and s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            depth += (s[j] == "{") - (s[j] == "}")
            if depth == 0:
                return s[i : j + 1], j + 1
        return s[i:], len(s)
    if i < len(s) and s[i] == "\\":  # a command such as \pi
        m = re.match(r"\\[A-Za-z]+|\\.", s[i:])
        end = i + (m.end() if m else 1)
        return "{" + s[i:end] + "}", end
    return ("{" + s[i] + "}", i + 1) if i < len(s) else ("{}", i)


def _fix_frac_sqrt(s: str) -> str:
    """``\\frac12 -> \\frac{1}{2}``, ``\\sqrt3 -> \\sqrt{3}`` (bare single-character arguments, also inside
    another's: ``\\frac{\\sqrt3}{3}``)."""
    out, i = [], 0
    while i < len(s):
        for cmd, nargs in (("\\frac", 2), ("\\sqrt", 1)):
            if s.startswith(cmd, i) and not s[i + len(cmd) : i + len(cmd) + 1].isalpha():
                j = i + len(cmd)
                if cmd == "\\sqrt" and s[j : j + 1] == "[" and (k := s.find("]", j)) > 0:  # \sqrt[n]{x}
                    out.append(s[i : k + 1])
                    j = k + 1
                else:
                    out.append(cmd)
                for _ in range(nargs):
                    arg, j = _brace_arg(s, j)
                    out.append("{" + _fix_frac_sqrt(arg[1:-1]) + "}" if arg.endswith("}") else arg)
                i = j
                break
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def normalize_math(s: str) -> str:
    """Canonical string form of a MATH answer (LaTeX noise, units, spacing and number formats)."""
    s = _ungroup(s.strip().replace("\n", "").rstrip("."))  # before units and "x =" are read: "{x = 9}"
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = re.sub(r"(?<!\\)\\ ", "", s)  # the "\ " space, not a "\\ " row break
    s = s.replace("\\displaystyle", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\s*|\\right\s*", "", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _TRAILING_UNIT.sub("", s.strip()).strip()
    s = _TEXT_CMD.sub(r"\1", s)  # \text{(C)} -> (C), \mbox{ cm} -> cm
    s = re.sub(r"(\d)\s+" + _UNIT_WORDS + r"(\^\{?\d\}?)?$", r"\1", s)  # "15 cm^2" -> "15"
    # "x = 5" / "k=5" -> "5" when the left side is a short variable name
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs.strip()) <= 2 and re.fullmatch(r"\s*\\?[A-Za-z]*\s*", lhs):
            s = rhs
    s = re.sub(r"^[A-Za-z]\s*\\in\s*", "", s)  # "x \\in [-2,7]" -> "[-2,7]"
    s = _ungroup(s.replace(" ", ""))  # again once \displaystyle, \text and spaces are gone: "\displaystyle{9}"
    s = re.sub(r"^\(([A-Z])\)$", r"\1", s)  # a multiple-choice letter: "(C)" -> "C"
    s = _fix_frac_sqrt(s)
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    s = s.replace("{,}", "")
    if re.fullmatch(r"-?\d+\.\d+|-?\d+", s):  # "3.50" -> "3.5", "5.0" -> "5"
        s = canonical_number(s) or s
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", s)  # "1/2" -> "\frac{1}{2}"
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    return s


def _ungroup(s: str) -> str:
    """``s`` without LaTeX grouping braces around the whole of it: ``"{ {9} }"`` -> ``"9"``."""
    while _outer_group(s):
        s = s[1:-1].strip()
    return s


def _outer_group(s: str) -> bool:
    """True if ``s`` is one ``{...}`` group (the opening brace closes at the end, not ``{1}{2}``)."""
    if not (s.startswith("{") and s.endswith("}")):
        return False
    depth = 0
    for i, c in enumerate(s):
        if i and s[i - 1] == "\\":  # an escaped brace is text
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0:
            return i == len(s) - 1
    return False


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a normalised plain number, ``\\frac{a}{b}`` or mixed number ``n\\frac{a}{b}``, else ``None``."""
    m = re.fullmatch(r"(-?)(\d*)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)  # "1\frac{4}{5}": a mixed number
    try:
        if m:
            v = int(m.group(2) or 0) + Fraction(int(m.group(3)), int(m.group(4)))
            return -v if m.group(1) else v
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            return Fraction(Decimal(s))
    except (ZeroDivisionError, ValueError):
        return None
    return None


def math_equal(pred: str | None, gold: str | None) -> bool:
    """True if both normalise to the same string or to the same exact number."""
    if pred is None or gold is None:
        return False
    a, b = normalize_math(pred), normalize_math(gold)
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    if fa is not None and fa == fb:
        return True
    # "enter all solutions": a bare comma list matches in any order (no brackets: intervals and tuples keep theirs)
    if "," in a and not re.search(r"[\[\](){}]", a + b):
        return sorted(a.split(",")) == sorted(b.split(","))
    return False


def _number_equal(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    a, b = canonical_number(pred), canonical_number(gold)
    return a is not None and a == b


_BOX_NOISE = re.compile(r"\\text\{[^{}]*\}|\\(?:mathrm|textbf)\{[^{}]*\}|\\[!,;: ]|\{,\}|\$|\\%|%")


def _gsm8k_answer(text: str) -> str | None:
    """The number in the last ``\\boxed{}`` (model outputs), else ``#### n`` (golds): ``1{,}000``, ``\\$18`` and
    ``18 \\text{ dollars}`` read as one number; a box holding several (``\\frac{3}{2}``, ``2 \\times 10^3``) reads as
    none rather than as its first."""
    if (boxed := extract_boxed(text)) is not None:
        numbers = _NUMBER.findall(_BOX_NOISE.sub("", boxed))
        if len(numbers) == 1:
            return canonical_number(numbers[0])
    return extract_gsm8k(text)


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Grader:
    """How one dataset's answers are read (``extract``) and compared (``is_correct``)."""

    name: str
    extract: Callable[[str], str | None]
    is_correct: Callable[[str | None, str | None], bool]


GRADERS: dict[str, Grader] = {
    "gsm8k": Grader("gsm8k", _gsm8k_answer, _number_equal),
    "math": Grader("math", extract_boxed_list, math_equal),
    "organism": Grader("organism", extract_organism, _number_equal),
}


def get_grader(dataset: str) -> Grader:
    """The grader for ``dataset``; ``ValueError`` naming the valid ones otherwise."""
    try:
        return GRADERS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {sorted(GRADERS)}") from None


def grade(dataset: str, text: str, gold: str) -> bool:
    """Extract the answer from a model ``text`` and compare it with ``gold``."""
    g = get_grader(dataset)
    return g.is_correct(g.extract(text), gold)
