"""Calculator (safe arithmetic + .count) and the python tool glue."""

import operator

import pytest

from nanochat.engine import use_calculator as engine_use_calculator
from nanochat.tools import (TOOL_NAMES, calculator_tool, evaluate_calculator, format_number, get_tool, parse_tool_call,
                            python_tool, run_tool_call, tool_call_json, use_calculator, web_search_budget)
from nanochat.web_search import format_results


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
    calculator = get_tool("calculator")
    assert calculator("12/60") == calculator_tool("12/60") == "0.2"  # nanochat's bare format, unchanged
    assert calculator("__import__('os')") is None                   # ... refusals still give no output
    assert get_tool(None) is None and get_tool("none") is None
    fn = lambda code: "x"  # noqa: E731
    assert get_tool(fn) is fn
    for bad in ("shell", ["calculator", "shell"], []):
        with pytest.raises(ValueError, match="unknown tool"):
            get_tool(bad)


def test_python_tool_prints_last_expression_and_reports_errors():
    assert python_tool("x = 6\nx * 7") == "42"
    assert python_tool("print('a')\nNone") == "a"
    assert python_tool("print('side'); sum(i for i in range(5))") == "side\n10"
    assert python_tool("1/0").endswith("ZeroDivisionError: division by zero")
    out = python_tool("import os; os.system('true')")
    assert "PermissionError" in out and "not allowed" in out


# -----------------------------------------------------------------------------
# dispatch by name

def test_json_calls_dispatch_by_name(search_docs):
    run = get_tool(list(TOOL_NAMES), search_provider=search_docs, search_k=2, search_max_chars=400)
    assert run(tool_call_json("calculator", expression="45 * 0.17")) == "7.65"
    assert run(tool_call_json("python", code="print(6 * 7)")) == "42"
    # web_search: the provider's results, formatted exactly as format_results does (what training data shows)
    expected = format_results(search_docs.search("weather in Oslo", 2), 400)
    assert run(tool_call_json("web_search", query="weather in Oslo")) == expected
    assert expected.startswith("[1] Weather in Oslo today")
    assert run('{"tool": "web_search", "arguments": {"query": "tea", "k": 1}}') == format_results(
        search_docs.search("tea", 1), 400)
    assert run("2 + 3") == "5"  # bare: the calculator, as in nanochat
    assert run("sum(range(4))") == "6"  # bare and refused by the calculator: python is enabled, so python runs it


@pytest.mark.parametrize("code, message", [
    ('{"tool": "shell", "arguments": {"cmd": "ls"}}', "unknown tool 'shell'"),
    ('{"tool": "web_search", "arguments": {"query": "x"}', "bad JSON"),
    ("{not json at all", "bad JSON"),
    ('{"tool": "calculator"}', 'calculator needs "arguments": {"expression"'),
    ('{"tool": "web_search", "arguments": {"query": ""}}', "web_search needs"),
    ('{"tool": "web_search", "arguments": {"query": "x", "k": 500}}', '"k" must be'),
    ('{"arguments": {"expression": "1"}}', 'needs {"tool"'),
])
def test_malformed_calls_are_error_text_not_exceptions(code, message):
    output = run_tool_call(code, enabled=TOOL_NAMES)
    assert output.startswith("tool error:") and message in output, output
    assert parse_tool_call(code).error is not None


def test_disabled_tools_and_tool_failures_are_error_text(search_docs):
    calculator_only = get_tool("calculator")
    assert "unknown tool 'web_search' (available: calculator)" in calculator_only(
        tool_call_json("web_search", query="weather"))
    assert run_tool_call(tool_call_json("calculator", expression="2 ** 10 ** 10")).startswith("calculator error:")
    assert "no search provider" in run_tool_call(tool_call_json("web_search", query="x"), search_provider=None)

    class BrokenProvider:
        def search(self, query, k):
            raise RuntimeError("disk on fire")
    output = run_tool_call(tool_call_json("web_search", query="x"), search_provider=BrokenProvider())
    assert output == "web_search error: RuntimeError: disk on fire"
    # a bare block with only web_search enabled names no tool it could run
    assert run_tool_call("1+1", enabled=("web_search",)).startswith("tool error: a bare expression")


def test_parse_names_the_tool_of_each_format():
    assert parse_tool_call("12/60").name == "calculator" and parse_tool_call("12/60").bare
    assert parse_tool_call("print(1)", enabled=("python",)).name == "python"
    call = parse_tool_call(tool_call_json("web_search", query="Seoul weather"))
    assert (call.name, call.argument, call.bare, call.error) == ("web_search", "Seoul weather", False, None)
    assert tool_call_json("web_search", query="café") == '{"tool": "web_search", "arguments": {"query": "café"}}'


def test_web_search_budget_fits_short_contexts():
    assert web_search_budget(2048) == web_search_budget(8192) == (3, 1500)
    assert web_search_budget(1024) == (2, 512) and web_search_budget(512) == (1, 256)
