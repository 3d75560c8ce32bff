"""
Tools the Engine can run when the model writes <|python_start|>code<|python_end|>.

A tool is a plain function `tool(code: str) -> str | None`: the text it returns is forced into the sequence as
<|output_start|>text<|output_end|>; None means "no output" (the model just continues), like the reference's
calculator does for anything it refuses.

- calculator: arithmetic on numbers (+ - * / // % **, parentheses, unary minus) and `"literal".count("x")`,
  evaluated by walking the `ast` (never `eval`), with limits so `9**9**9` cannot hang. This is what the
  reference's GSM8K (`<<12/60=0.2>>`) and SpellingBee (`'strawberry'.count('r')`) data teach the model.
- python: runs the code in the sandbox (nanochat.execution) and returns what it printed (or the error). If the
  last statement is an expression its value is printed, like a REPL, so `sum(range(10))` yields `45`.

- web_search: searches a provider (nanochat.web_search) and returns the formatted results.

A block calls a tool by name with JSON, {"tool": "web_search", "arguments": {"query": "..."}} (calculator takes
"expression", python "code"; web_search an optional "k"), or holds a bare expression, nanochat's calculator
format, kept as it was. Which tools a block may call is chosen per Engine / per generate call: `get_tool(tools)`
maps that choice (a name, a list of names, None, or a function) to the function the Engine runs. A malformed call
(bad JSON, an unknown or disabled tool, a missing argument) or a failing tool gives an error string as the tool
output, never an exception: the model sees what went wrong and the generation goes on.
"""

import ast
import functools
import json
import math
import operator
from dataclasses import dataclass

from nanochat.execution import execute_code
from nanochat.web_search import DEFAULT_TOOL_OUTPUT_CHARS, run_web_search

# -----------------------------------------------------------------------------
# Calculator

MAX_EXPR_CHARS = 1000
MAX_INT_DIGITS = 1000        # any intermediate integer beyond this many digits is refused
MAX_FLOAT_MAGNITUDE = 1e300  # floats beyond this (or inf/nan) are refused

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalculatorRefused(Exception):
    """The expression is not something the calculator evaluates."""


def _check_number(value):
    if isinstance(value, bool):
        raise CalculatorRefused("booleans are not numbers here")
    if isinstance(value, int):
        # digit count without converting to str (which is itself slow for huge ints)
        if value and value.bit_length() * 0.30103 > MAX_INT_DIGITS:
            raise CalculatorRefused("integer too large")
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_FLOAT_MAGNITUDE:
            raise CalculatorRefused("float out of range")
    else:
        raise CalculatorRefused(f"not a number: {type(value).__name__}")
    return value


def _power(base, exponent):
    # Estimate the size of the result before computing it: |base|**exponent has about exponent*log10|base| digits.
    if isinstance(exponent, int) and exponent < 0 and base == 0:
        raise CalculatorRefused("0 to a negative power")
    if abs(base) > 1 and abs(exponent) > 1:
        digits = abs(exponent) * math.log10(abs(base))
        if digits > MAX_INT_DIGITS:
            raise CalculatorRefused("power too large")
    result = base ** exponent
    if isinstance(result, complex):
        raise CalculatorRefused("complex result")
    return result


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return _check_number(node.value)
        raise CalculatorRefused(f"constant {node.value!r}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _check_number(_UNARY_OPS[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_number(_power(left, right))
        return _check_number(_BINARY_OPS[type(node.op)](left, right))
    if _is_string_count(node):
        return node.func.value.value.count(node.args[0].value)
    raise CalculatorRefused(f"unsupported syntax: {type(node).__name__}")


def _is_string_count(node):
    """`"literal".count("literal")` and nothing else: no names, no other methods, no keyword arguments."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def format_number(value):
    """How a result is written back into the sequence: integral floats without '.0' (GSM8K's data writes
    `<<48/2=24>>`), others rounded to 10 decimals so 0.1+0.2 reads 0.3."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(round(value, 10))
    return str(value)


def evaluate_calculator(expr):
    """Evaluate a calculator expression; returns an int/float, or None if it is refused or fails."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS or "__" in expr:
        return None
    expr = expr.strip()
    if "count(" not in expr:
        expr = expr.replace(",", "")  # thousands separators, as in the reference ("1,000*3")
    try:
        tree = ast.parse(expr, mode="eval")
        return _evaluate(tree)
    except (CalculatorRefused, SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError,
            RecursionError, MemoryError):
        return None


def use_calculator(expr):
    """The reference's name: the result of a calculator expression, or None if refused. (Engine uses
    `calculator_tool`, which also formats the result as text.)"""
    return evaluate_calculator(expr)


def calculator_tool(code):
    result = evaluate_calculator(code)
    return None if result is None else format_number(result)


# -----------------------------------------------------------------------------
# Python (sandboxed)

MAX_TOOL_OUTPUT_CHARS = 1000


def _print_last_expression(code):
    """Rewrite `...; expr` into `...; print(expr)` (when the value is not None), like a REPL."""
    try:
        tree = ast.parse(code, mode="exec")
    except SyntaxError:
        return code  # let the sandbox report the syntax error
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    last = tree.body[-1]
    value = ast.unparse(last.value)
    head = ast.unparse(ast.Module(body=tree.body[:-1], type_ignores=[])) if len(tree.body) > 1 else ""
    return f"{head}\n__value__ = ({value})\nif __value__ is not None:\n    print(__value__)\n"


def python_tool(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run the code in the sandbox; return what it printed, or the error, trimmed to a readable length."""
    result = execute_code(_print_last_expression(code), timeout=timeout, maximum_memory_bytes=maximum_memory_bytes)
    text = result.stdout.strip()
    if not result.success:
        text = (text + "\n" if text else "") + (result.error or "error")
    if len(text) > MAX_TOOL_OUTPUT_CHARS:
        text = text[:MAX_TOOL_OUTPUT_CHARS] + "…"
    return text


# -----------------------------------------------------------------------------
# Dispatch by name: what the Engine runs for one <|python_start|>...<|python_end|> block

TOOL_NAMES = ("calculator", "python", "web_search")
ARGUMENT_NAMES = {"calculator": "expression", "python": "code", "web_search": "query"}
MAX_SEARCH_RESULTS = 10


@dataclass
class ToolCall:
    """One parsed tool block: the tool it calls and its main argument, or why it is malformed (error)."""
    name: str | None
    argument: str | None = None
    bare: bool = False    # nanochat's format (an expression / code, no JSON)
    k: int | None = None  # web_search: how many results (JSON "k"), None for the default
    error: str | None = None


def tool_call_json(name, **arguments):
    """The JSON a model writes to call a tool, {"tool": name, "arguments": {...}}: one spelling for the training
    data and for the calls the Engine writes itself (auto search), so both look alike to the model."""
    return json.dumps({"tool": name, "arguments": arguments}, ensure_ascii=False)


def parse_tool_call(code, enabled=TOOL_NAMES):
    """Parse a tool block's text. JSON {"tool": name, "arguments": {...}} calls a tool by name (the text starts
    with "{"); anything else is nanochat's bare format, run by the calculator, or by python when only python is
    enabled. Never raises: a malformed call comes back with .error set."""
    text = code.strip()
    if not text.startswith("{"):
        name = "calculator" if "calculator" in enabled else "python" if "python" in enabled else None
        if name is None:
            return ToolCall(None, error=f'a bare expression needs the calculator; call {"/".join(enabled)} as JSON '
                                        f'{{"tool": "{enabled[0] if enabled else "name"}", "arguments": {{...}}}}')
        return ToolCall(name, code, bare=True)
    try:
        call = json.loads(text)
    except json.JSONDecodeError as e:
        return ToolCall(None, error=f'bad JSON ({e.msg} at column {e.colno}); write {{"tool": "name", '
                                    f'"arguments": {{...}}}}')
    if not isinstance(call, dict) or not isinstance(call.get("tool"), str):
        return ToolCall(None, error='a JSON tool call needs {"tool": "name", "arguments": {...}}')
    name, arguments = call["tool"], call.get("arguments")
    if name not in enabled:
        return ToolCall(None, error=f"unknown tool {name!r} (available: {', '.join(enabled) or 'none'})")
    key = ARGUMENT_NAMES[name]
    if not isinstance(arguments, dict) or not isinstance(arguments.get(key), str) or not arguments[key].strip():
        return ToolCall(name, error=f'{name} needs "arguments": {{"{key}": "..."}}')
    k = arguments.get("k")
    if name == "web_search" and k is not None and not (isinstance(k, int) and 1 <= k <= MAX_SEARCH_RESULTS):
        return ToolCall(name, error=f'web_search "k" must be an integer from 1 to {MAX_SEARCH_RESULTS}')
    return ToolCall(name, arguments[key], k=k)


def web_search_budget(sequence_len):
    """(results, characters) of one web_search output for a model with this context: 3 results in at most 1500
    characters from 2048 tokens up; below that fewer results in sequence_len // 2 characters (about a quarter of
    the context), so the question, the reasoning, the answer, and in a follow-up a second search, still fit. The
    Engine and the training data generator both use it, so training outputs are shaped like inference ones."""
    if sequence_len >= 2048:
        return 3, DEFAULT_TOOL_OUTPUT_CHARS
    return (2 if sequence_len >= 1024 else 1), sequence_len // 2


def run_tool_call(code, enabled=TOOL_NAMES, search_provider=None, search_k=3,
                  search_max_chars=DEFAULT_TOOL_OUTPUT_CHARS):
    """The text a tool block produces (None: no output, the model just continues). Bare expressions keep
    nanochat's rule (None when the calculator refuses, unless python is enabled too, which then runs them);
    everything else that goes wrong (bad JSON, unknown tool, a failing tool) is an error string, never an
    exception, so a model's mistake never ends a generation."""
    call = parse_tool_call(code, enabled)
    if call.error:
        return f"tool error: {call.error}"
    try:
        if call.name == "calculator":
            result = calculator_tool(call.argument)
            if result is None and call.bare and "python" in enabled:
                return python_tool(call.argument)
            if result is None and not call.bare:
                return (f"calculator error: cannot evaluate {call.argument[:80]!r} (numbers, + - * / // % ** and "
                        f"parentheses only)")
            return result
        if call.name == "python":
            return python_tool(call.argument)
        return run_web_search(search_provider, call.argument, call.k or search_k, search_max_chars)
    except Exception as e:  # a tool's own failure is text the model sees, not a crashed generation
        return f"{call.name} error: {type(e).__name__}: {e}"


def get_tool(tools, search_provider=None, search_k=3, search_max_chars=DEFAULT_TOOL_OUTPUT_CHARS):
    """The Engine's `tools=`: a tool name ("calculator", nanochat's default; "python"; "web_search"), a list of
    them, None/"none" (tool blocks are left alone), or any function code -> str | None. Names give a function
    that dispatches each block by name (run_tool_call) among the enabled tools; web_search searches
    search_provider (see nanochat.web_search.provider_from_env)."""
    if tools is None or tools == "none":
        return None
    if callable(tools):
        return tools
    names = (tools,) if isinstance(tools, str) else tuple(tools)
    unknown = [name for name in names if name not in TOOL_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown tool {unknown[0] if unknown else names!r}: choose from {list(TOOL_NAMES)}, "
                         f"None, or pass a function")
    return functools.partial(run_tool_call, enabled=tuple(dict.fromkeys(names)), search_provider=search_provider,
                             search_k=search_k, search_max_chars=search_max_chars)
