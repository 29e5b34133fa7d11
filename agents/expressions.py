"""Safe expressions over an AST whitelist: the calculator tool, workflow conditions and `${...}`
templates. Nothing is ever passed to `eval`; unknown syntax is an `ExpressionError`.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any


class ExpressionError(ValueError):
    """An expression that is not allowed, not well-formed, or fails to evaluate."""


_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
MATH_FUNCTIONS = {
    "abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "log": math.log, "log10": math.log10,
    "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan, "floor": math.floor, "ceil": math.ceil,
}
CONDITION_FUNCTIONS = {"len": len, "lower": lambda s: str(s).lower(), "str": str, "int": int, "float": float,
                       "bool": bool, "abs": abs, "min": min, "max": max}
MATH_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_POWER = 1000
MAX_LENGTH = 500


class _Evaluator:
    def __init__(self, names: dict[str, Any], functions: dict[str, Any], arithmetic_only: bool):
        self.names, self.functions, self.arithmetic_only = names, functions, arithmetic_only

    def eval(self, node: ast.AST) -> Any:
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise ExpressionError(f"{type(node).__name__} is not allowed")
        return method(node)

    def _Expression(self, node):
        return self.eval(node.body)

    def _Constant(self, node):
        if self.arithmetic_only and not isinstance(node.value, (int, float)) or isinstance(node.value, complex):
            raise ExpressionError(f"constant {node.value!r} is not allowed")
        return node.value

    def _BinOp(self, node):
        op = _BINARY.get(type(node.op))
        if op is None:
            raise ExpressionError(f"operator {type(node.op).__name__} is not allowed")
        left, right = self.eval(node.left), self.eval(node.right)
        if op is operator.pow and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
            raise ExpressionError(f"exponent {right} is too large (limit {MAX_POWER})")
        try:
            return op(left, right)
        except ZeroDivisionError:
            raise ExpressionError("division by zero") from None
        except (TypeError, OverflowError) as e:
            raise ExpressionError(str(e)) from None

    def _UnaryOp(self, node):
        if self.arithmetic_only and isinstance(node.op, ast.Not):
            raise ExpressionError("'not' is not allowed here")
        return _UNARY[type(node.op)](self.eval(node.operand))

    def _Call(self, node):
        if not isinstance(node.func, ast.Name) or node.func.id not in self.functions:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise ExpressionError(f"unknown function {name!r}; allowed: {', '.join(sorted(self.functions))}")
        if node.keywords:
            raise ExpressionError("keyword arguments are not allowed")
        args = [self.eval(a) for a in node.args]
        try:
            return self.functions[node.func.id](*args)
        except (TypeError, ValueError, OverflowError) as e:
            raise ExpressionError(f"{node.func.id}: {e}") from None

    def _Name(self, node):
        if node.id in self.names:
            return self.names[node.id]
        if not self.arithmetic_only and node.id in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[node.id]
        raise ExpressionError(f"unknown name {node.id!r}")

    # Conditions only ---------------------------------------------------------------------

    def _guard(self, what: str) -> None:
        if self.arithmetic_only:
            raise ExpressionError(f"{what} is not allowed in arithmetic")

    def _Compare(self, node):
        self._guard("comparison")
        left = self.eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.eval(comparator)
            try:
                if not _COMPARE[type(op)](left, right):
                    return False
            except TypeError as e:
                raise ExpressionError(str(e)) from None
            left = right
        return True

    def _BoolOp(self, node):
        self._guard("and/or")
        if isinstance(node.op, ast.And):
            return all(self.eval(v) for v in node.values)
        return any(self.eval(v) for v in node.values)

    def _Attribute(self, node):
        self._guard("attribute access")
        if node.attr.startswith("_"):
            raise ExpressionError(f"attribute {node.attr!r} is not allowed")
        return _lookup(self.eval(node.value), node.attr)

    def _Subscript(self, node):
        self._guard("indexing")
        return _lookup(self.eval(node.value), self.eval(node.slice))

    def _List(self, node):
        self._guard("list")
        return [self.eval(e) for e in node.elts]

    def _Tuple(self, node):
        self._guard("tuple")
        return tuple(self.eval(e) for e in node.elts)


def _lookup(value: Any, key: Any) -> Any:
    try:
        if isinstance(value, dict):
            return value[key]
        if isinstance(value, (list, tuple, str)) and isinstance(key, int):
            return value[key]
    except (KeyError, IndexError):
        raise ExpressionError(f"no {key!r} in {type(value).__name__}") from None
    raise ExpressionError(f"cannot look up {key!r} in {type(value).__name__}")


def _parse(expression: str) -> ast.Expression:
    if not isinstance(expression, str) or not expression.strip():
        raise ExpressionError("expression must be a non-empty string")
    if len(expression) > MAX_LENGTH:
        raise ExpressionError(f"expression longer than {MAX_LENGTH} characters")
    try:
        return ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"not a valid expression: {e.msg}") from None


def calculate(expression: str) -> float | int:
    """Arithmetic with + - * / // % **, parentheses, math functions and pi/e; nothing else."""
    value = _Evaluator(MATH_CONSTANTS, MATH_FUNCTIONS, True).eval(_parse(expression))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExpressionError("the result is not a number")
    return value


def evaluate(expression: str, names: dict[str, Any]) -> Any:
    """A condition or value over `names` (comparisons, and/or/not, a.b, a['b'], a[0], len())."""
    return _Evaluator(names, CONDITION_FUNCTIONS, False).eval(_parse(expression))


_TEMPLATE = re.compile(r"\$\{([^}]+)\}")


def render(value: Any, names: dict[str, Any]) -> Any:
    """Fill `${expr}` templates in a (nested) value. A string that is exactly one template keeps
    the expression's type; templates inside longer strings are formatted into the text."""
    if isinstance(value, dict):
        return {k: render(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, names) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _TEMPLATE.fullmatch(value.strip())
    if whole:
        return evaluate(whole.group(1), names)
    return _TEMPLATE.sub(lambda m: _text(evaluate(m.group(1), names)), value)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    import json

    return json.dumps(value, default=str)


def references(value: Any) -> set[str]:
    """Step ids a value's templates read (`steps.<id>...`), for dependency checks."""
    found: set[str] = set()
    if isinstance(value, dict):
        for v in value.values():
            found |= references(v)
    elif isinstance(value, list):
        for v in value:
            found |= references(v)
    elif isinstance(value, str):
        for m in _TEMPLATE.finditer(value):
            found |= set(re.findall(r"\bsteps\.([A-Za-z0-9_-]+)", m.group(1)))
            found |= set(re.findall(r"\bsteps\[['\"]([A-Za-z0-9_-]+)['\"]\]", m.group(1)))
    return found


TEMPLATE_NAMES = frozenset({"inputs", "steps", "item", "index", "true", "false", "null"})


def check(expression: str, names: frozenset[str] = TEMPLATE_NAMES) -> None:
    """Refuse, without evaluating, what `evaluate` would refuse when it runs: syntax outside the
    whitelist, unknown functions or names (`__import__('os')`), private attributes. A workflow's
    expressions are checked this way when it is defined, not when its step runs."""
    tree = _parse(expression)
    allowed = {name for name in dir(_Evaluator) if name.startswith("_") and name[1:2].isupper()}
    for node in ast.walk(tree):
        if isinstance(node, (ast.expr, ast.Expression)) and f"_{type(node).__name__}" not in allowed:
            raise ExpressionError(f"{type(node).__name__} is not allowed")
        if isinstance(node, ast.BinOp) and type(node.op) not in _BINARY or \
                isinstance(node, ast.UnaryOp) and type(node.op) not in _UNARY or \
                isinstance(node, ast.Compare) and any(type(op) not in _COMPARE for op in node.ops):
            raise ExpressionError(f"operator in {ast.unparse(node)!r} is not allowed")
        if isinstance(node, ast.Call):
            func = node.func
            if not isinstance(func, ast.Name) or func.id not in CONDITION_FUNCTIONS:
                name = func.id if isinstance(func, ast.Name) else ast.unparse(func)
                raise ExpressionError(f"unknown function {name!r}; allowed: {', '.join(sorted(CONDITION_FUNCTIONS))}")
            if node.keywords:
                raise ExpressionError("keyword arguments are not allowed")
        elif isinstance(node, ast.Name) and node.id not in names and node.id not in CONDITION_FUNCTIONS:
            raise ExpressionError(f"unknown name {node.id!r}; expressions read {', '.join(sorted(names))}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ExpressionError(f"attribute {node.attr!r} is not allowed")


def check_templates(value: Any) -> None:
    """`check` every `${...}` expression in a (nested) template value."""
    if isinstance(value, dict):
        for v in value.values():
            check_templates(v)
    elif isinstance(value, list):
        for v in value:
            check_templates(v)
    elif isinstance(value, str):
        for m in _TEMPLATE.finditer(value):
            check(m.group(1))
