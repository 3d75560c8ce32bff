"""Calculator (safe arithmetic + .count) and the python tool glue."""

import operator

import pytest

from nanochat.engine import use_calculator as engine_use_calculator
from nanochat.tools import calculator_tool, evaluate_calculator, format_number, get_tool, python_tool, use_calculator


@pytest.mark.parametrize("expr, expected", [
    ("1+2*3", 1 + 2 * 3),
    ("(2+3)*-4", (2 + 3) * -4),
    ("7//2", 7 // 2),
    ("7%3", 7 % 3),
    ("-7 / 2", -7 / 2),
    ("2**10", 2 ** 10),
    ("2**-2", 2 ** -2),
    ("+5 - -5", 10),
    ("0.5*(3.25+1e2)", 0.5 * (3.25 + 1e2)),
    ("12 / 60", 12 / 60),
])
def test_arithmetic_matches_python(expr, expected):
    assert use_calculator(expr) == expected
    assert engine_use_calculator is use_calculator  # nanochat's import path keeps working


def test_thousands_separators_are_ignored():
    assert use_calculator("1,000 * 3") == 3000


def test_string_count():
    assert use_calculator("'strawberry'.count('r')") == "strawberry".count("r")
    assert use_calculator('"a,b,,c".count(",")') == 3  # commas inside the strings are kept
    assert calculator_tool("'banana'.count('a')") == "3"


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')",
    "x + 1",
    "abs(-3)",
    "(1).real",
    "'abc'.upper()",
    "'abc'.count(x)",
    "'abc'.count('a', 1)",
    "'a' * 5",
    "lambda: 1",
    "[1, 2][0]",
    "True + 1",
    "1 if 1 else 2",
    "().__class__",
    "import os",
    "open('/etc/passwd')",
    "1/0",
    "9**9**9",
    "10**10**10",
    "(10**500)**3",
    "2.0**5000",
    "(-8)**0.5",
    "",
    "1 +",
    "1; 2",
])
def test_refuses_everything_else(expr):
    assert use_calculator(expr) is None
    assert calculator_tool(expr) is None


def test_huge_intermediate_products_are_refused():
    big = "*".join(["999999999"] * 200)  # 1800 digits
    assert use_calculator(big) is None
    small = "*".join(["999999999"] * 5)
    assert use_calculator(small) == operator.mul(*[999999999] * 2) * 999999999 ** 3


def test_format_number():
    assert format_number(24.0) == "24"      # GSM8K writes <<48/2=24>>
    assert format_number(0.1 + 0.2) == "0.3"
    assert format_number(1 / 3) == "0.3333333333"
    assert format_number(-5) == "-5"
    assert calculator_tool("48/2") == "24" and calculator_tool("12/60") == "0.2"
    assert evaluate_calculator("48/2") == 24.0


def test_get_tool():
    assert get_tool("calculator") is calculator_tool
    assert get_tool("python") is python_tool
    assert get_tool(None) is None and get_tool("none") is None
    fn = lambda code: "x"  # noqa: E731
    assert get_tool(fn) is fn
    with pytest.raises(ValueError, match="unknown tool"):
        get_tool("shell")


def test_python_tool_prints_last_expression_and_reports_errors():
    assert python_tool("x = 6\nx * 7") == "42"
    assert python_tool("print('a')\nNone") == "a"
    assert python_tool("print('side'); sum(i for i in range(5))") == "side\n10"
    assert python_tool("1/0").endswith("ZeroDivisionError: division by zero")
    out = python_tool("import os; os.system('true')")
    assert "PermissionError" in out and "not allowed" in out
