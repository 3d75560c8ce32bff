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

`get_tool(name)` maps the Engine's `tools=` choice ("calculator", "python", None) to a function.
"""

import ast
import math
import operator

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
    from nanochat.execution import execute_code
    result = execute_code(_print_last_expression(code), timeout=timeout, maximum_memory_bytes=maximum_memory_bytes)
    text = result.stdout.strip()
    if not result.success:
        text = (text + "\n" if text else "") + (result.error or "error")
    if len(text) > MAX_TOOL_OUTPUT_CHARS:
        text = text[:MAX_TOOL_OUTPUT_CHARS] + "…"
    return text


TOOLS = {"calculator": calculator_tool, "python": python_tool}


def get_tool(tools):
    """The Engine's `tools=` argument: "calculator" (default, like the reference), "python" (sandbox),
    None/"none" (tool calls are left alone), or any function code -> str | None."""
    if tools is None or tools == "none":
        return None
    if callable(tools):
        return tools
    if tools not in TOOLS:
        raise ValueError(f"unknown tool {tools!r}: choose one of {sorted(TOOLS)}, None, or pass a function")
    return TOOLS[tools]
