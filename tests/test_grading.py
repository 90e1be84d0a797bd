from __future__ import annotations

import json

import pytest

from reasonscope.traces.grading import (
    GRADERS,
    extract_boxed,
    extract_gsm8k,
    extract_organism,
    grade,
    normalize_math,
)

from conftest import shared_data


def _records(rel: str) -> list[dict]:
    path = shared_data(rel)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- real data


def test_gsm8k_reference_solutions_all_correct():
    recs = _records("gsm8k/test.jsonl")
    golds = [r["answer"].rsplit("####", 1)[1].strip() for r in recs]
    ok = sum(grade("gsm8k", r["answer"], g) for r, g in zip(recs, golds))
    print(f"GSM8K reference solutions graded correct: {ok}/{len(recs)} = {ok / len(recs):.2%}")
    assert len(recs) == 1319 and ok == 1319  # the README's figure: 1319/1319


def test_math500_boxed_solutions_match_answers():
    recs = _records("math500/test.jsonl")
    ok = sum(grade("math", r["solution"], r["answer"]) for r in recs)
    print(f"MATH-500 last \\boxed{{}} of solution vs answer: {ok}/{len(recs)} = {ok / len(recs):.2%}")
    assert len(recs) == 500 and ok == 500  # the README's figure: 500/500


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 1,000", "1000"),
        ("#### $3.50", "3.5"),
        ("#### -12", "-12"),
        ("#### 5.0", "5"),
        ("#### 1 \n#### 2", "2"),
        ("no marker 42", None),
        ("#### none", None),
        ("#### 3/4", "0.75"),
        ("#### 6 / 2", "3"),
        ("#### 1/0", None),
        ("#### 1/3", None),
        ("#### Step 2: Conclusion", None),  # a markdown heading, not an answer
    ],
)
def test_extract_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the answer is \\boxed{5}.", "5"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("$\\boxed 5$", "5"),
        ("\\fbox{x+1}", "x+1"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_organism():
    assert extract_organism("<think> a = 3 , 3 + 4 = 7 </think> 7 .") == "7"
    assert extract_organism("the answer is 4 , not 5") == "4"
    assert extract_organism("</think> no digits") is None
    assert extract_organism("</think>4.") == "4" and extract_organism("</think>-3.") == "-3"
    assert extract_organism("</think> 3.5") is None and extract_organism("</think> 3/4") is None  # not integers


# ---------------------------------------------------------------- normalisation and equality


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\tfrac 3 4", "\\frac{3}{4}"),
        ("$\\left( 3, \\frac{\\pi}{2} \\right)$", "(3,\\frac{\\pi}{2})"),
        ("90^\\circ", "90"),
        ("15\\mbox{ cm}^2", "15"),
        ("5 \\text{ inches}", "5"),
        ("\\text{(C)}", "C"),  # a multiple-choice letter
        ("x \\in [-2,7]", "[-2,7]"),
        ("x = 5", "5"),
        ("\\$1,000.00", "1000"),
        ("10\\%", "10"),
        (".5", "0.5"),
        ("3/4", "\\frac{3}{4}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("\\frac\\pi2", "\\frac{\\pi}{2}"),
        ("2\\!\\cdot\\!3", "2\\cdot3"),
        ("{9}", "9"),  # grouping braces around the whole answer
        ("{ {\\frac{1}{2}} }", "\\frac{1}{2}"),
        ("{1}{2}", "{1}{2}"),  # two groups, not one
        ("\\{1,2\\}", "\\{1,2\\}"),  # a set's escaped braces stay
        ("{9 \\text{ cm}}", "9"),  # dropped before the units and "x =" are read
        ("{x = 9}", "9"),
    ],
)
def test_normalize_math(raw, norm):
    assert normalize_math(raw) == norm


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("0.5", "\\frac{1}{2}", True),
        ("-\\dfrac{5}{12}", "-\\frac{5}{12}", True),
        ("\\frac{10}{4}", "\\frac52", True),
        ("6.17", "6.17", True),
        ("6.07", "6.17", False),
        ("-1", "1", False),
        ("\\frac{1}{4027}", "-\\frac{1}{4027}", False),
        ("C", "\\text{(C)}", True),
        ("[-2, 7]", "x \\in [-2,7]", True),
        ("-2, 1", "1,-2", True),  # "enter all solutions": any order
        ("1,-2", "1,2", False),
        ("(2,1)", "(1,2)", False),  # an ordered pair keeps its order
        ("[2,1]", "[1,2]", False),
        (None, "1", False),
        ("\\begin{pmatrix}-2\\\\-14\\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\end{pmatrix}", True),  # \\ rows
        ("\\begin{pmatrix}-2\\\\14\\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\end{pmatrix}", False),
        ("\\frac{9}{5}", "1\\frac{4}{5}", True),  # a mixed number
        ("137.5", "137 \\frac{1}{2}", True),
        ("-1.8", "-1\\frac{4}{5}", True),
        ("1.8", "-1\\frac{4}{5}", False),
        ("\\frac{\\sqrt3}{3}", "\\frac{\\sqrt{3}}{3}", True),  # bare arguments inside another command's
    ],
)
def test_math_equality(pred, gold, ok):
    assert GRADERS["math"].is_correct(pred, gold) is ok


def test_grade_registry():
    assert set(GRADERS) == {"gsm8k", "math", "organism"}
    assert grade("gsm8k", "so she earns \\boxed{1,200} dollars", "1200")  # model-style output
    assert not grade("gsm8k", "#### 1201", "1200")
    # a boxed GSM8K answer is one number: MATH's thousands separators and units read, several numbers do not
    for box, gold, ok in [
        ("\\boxed{1{,}000}", "1000", True),
        ("\\boxed{1\\,000}", "1000", True),
        ("\\boxed{\\$18}", "18", True),
        ("\\boxed{18 \\text{ dollars}}", "18", True),
        ("\\boxed{\\frac{3}{2}}", "3", False),
        ("\\boxed{2 \\times 10^3}", "2", False),
    ]:
        assert grade("gsm8k", box, gold) is ok, box
    assert grade("math", "</think> The answer is $\\boxed{\\dfrac{3}{4}}$.", "\\frac34")
    assert grade("gsm8k", "#### Step 2: Conclusion\nSo \\boxed{18}.", "18")  # the box wins over a heading
    # a list boxed item by item reads as the list; boxes apart (thinking, then answer) do not join
    assert grade("math", "\\boxed{2}, \\boxed{-3}", "2, -3") and grade("math", "$\\boxed{1}$ and $\\boxed{-2}$", "-2,1")
    assert grade("math", "so \\boxed{4}. </think> The answer is \\boxed{5}", "5")
    assert grade("math", "$d = \\boxed{15\\frac{39}{40}},$ or $\\boxed{\\frac{639}{40}}$ inches.", "\\frac{639}{40}")
    assert grade("organism", "<think> 2 + 5 = 7 </think> 7", "7")
    with pytest.raises(ValueError, match="gsm8k.*math.*organism"):
        grade("aime", "1", "1")
