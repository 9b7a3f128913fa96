"""The tools an agent recipe can name: MiniMind-3's six mocks (`train_agent.py`'s tables) and any typed function.

A tool is a Python function with type hints and a Google-style docstring (`Args:` describes every parameter); its
JSON schema comes from transformers' `get_json_schema`, the same one TRL and `apply_chat_template` use. A recipe
names tools by key (`TOOLS`) or by import path (`package.module.function`); `register_tool` adds one by code.

Whatever a tool does, the model gets a JSON string back, never a crashed run (`Tool.__call__`):

- the result as JSON (`ensure_ascii=False`, as the original writes it), cut at `MAX_RESULT_CHARS` (2048) characters;
- `{"error": ...}` when the tool raises, gets arguments it does not take, or runs past `TIME_LIMIT_S` (1 s, the
  original's `signal.alarm(1)`);
- `{"error": "tool not found"}` for a name the registry lacks (`run_tool`).

`calculate_math` evaluates with an `ast` walker over numbers, arithmetic and `math` functions, never `eval`: the
original's `eval(..., {"__builtins__": {}})` can still be escaped, and `9**9**9` would hang it past its alarm.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import math
import operator
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

from transformers.utils import get_json_schema

MAX_RESULT_CHARS = 2048
TIME_LIMIT_S = 1.0
NOT_FOUND = json.dumps({"error": "tool not found"})

# --- The original's tables (train_agent.py), reimplemented -------------------------------------------------------

WEATHER = {
    "北京": ("28°C", "晴"),
    "上海": ("15°C", "多云"),
    "广州": ("32°C", "闷热"),
    "深圳": ("30°C", "晴"),
    "杭州": ("22°C", "阴"),
    "成都": ("18°C", "小雨"),
    "武汉": ("25°C", "多云"),
    "南京": ("20°C", "晴"),
    "西安": ("16°C", "大风"),
    "重庆": ("26°C", "阴"),
    "Tokyo": ("12°C", "晴"),
    "New York": ("8°C", "多云"),
    "London": ("5°C", "小雨"),
    "Paris": ("10°C", "阴"),
    "Sydney": ("25°C", "晴朗"),
}
DEFAULT_WEATHER = ("22°C", "晴")
TIMES = {
    "Asia/Shanghai": "2025-03-07 14:30:00",
    "America/New_York": "2025-03-07 01:30:00",
    "Europe/London": "2025-03-07 06:30:00",
    "Asia/Tokyo": "2025-03-07 15:30:00",
    "Europe/Paris": "2025-03-07 07:30:00",
    "Australia/Sydney": "2025-03-07 17:30:00",
}
DEFAULT_TIME = "2025-03-07 14:30:00"
EXCHANGE_RATES = {
    ("USD", "CNY"): 7.21,
    ("EUR", "CNY"): 7.85,
    ("GBP", "CNY"): 9.12,
    ("JPY", "CNY"): 0.048,
    ("USD", "EUR"): 0.92,
    ("USD", "GBP"): 0.79,
    ("CNY", "JPY"): 20.83,
    ("AUD", "CNY"): 4.72,
}
TRANSLATIONS = {
    ("你好世界", "english"): "Hello World",
    ("Good morning", "chinese"): "早上好",
    ("今天天气真好", "english"): "The weather is nice today",
    ("I love programming", "chinese"): "我喜欢编程",
    ("机器学习很有趣", "english"): "Machine learning is interesting",
    ("Happy birthday", "chinese"): "生日快乐",
}
# Multiplicative factors, keyed `from_to` in lower case; an unknown pair multiplies by 1 (the original's default).
# Temperatures are a plain factor too, as in the original's table (a mock, not a converter).
UNIT_FACTORS = {
    "km_miles": 0.621371,
    "miles_km": 1.60934,
    "kg_pounds": 2.20462,
    "pounds_kg": 0.453592,
    "meters_feet": 3.28084,
    "feet_meters": 0.3048,
    "celsius_fahrenheit": 1.8,
    "fahrenheit_celsius": 0.5556,
}

# --- The safe evaluator ------------------------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {
    name: getattr(math, name)
    for name in (
        "sqrt", "exp", "log", "log2", "log10", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh",
        "tanh", "fabs", "floor", "ceil", "trunc", "degrees", "radians", "hypot", "gcd", "lcm", "comb", "perm",
    )
}  # fmt: skip
_FUNCTIONS.update(abs=abs, round=round, min=min, max=max, pow=pow)
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
# Bounds that keep every evaluation short: no exponent above 10000, no integer above 4096 bits, no factorial.
MAX_EXPONENT = 10_000
MAX_INT_BITS = 4096
# The original's spelling fixes before evaluating (full-width and typographic operators).
_REPLACEMENTS = (("^", "**"), ("×", "*"), ("÷", "/"), ("−", "-"), ("（", "("), ("）", ")"))


def _check_size(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError("number too large")
    return value


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    # `math.pi`, as the original's namespace allowed.
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math":
        if node.attr in _CONSTANTS:
            return _CONSTANTS[node.attr]
    if isinstance(node, ast.Call) and not node.keywords:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "math" else None
        name = func.id if isinstance(func, ast.Name) else name
        if name in _FUNCTIONS:
            args = [_evaluate(arg) for arg in node.args]
            if name == "pow" and len(args) >= 2 and abs(args[1]) > MAX_EXPONENT:
                raise ValueError("exponent too large")
            return _check_size(_FUNCTIONS[name](*args))
    raise ValueError(f"unsupported expression: {ast.dump(node)[:80]}")


def safe_eval(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, `+ - * / // % **`, parentheses, `math` functions and
    constants (`sqrt(2)`, `math.pi`); anything else (names, attributes, subscripts, lambdas) is a ValueError."""
    for old, new in _REPLACEMENTS:
        expression = expression.replace(old, new)
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"invalid expression: {error.msg}") from None
    return _evaluate(tree)


# --- The six mocks -----------------------------------------------------------------------------------------------


def calculate_math(expression: str) -> dict:
    """Evaluate a mathematical expression.

    Args:
        expression: the arithmetic expression to evaluate, e.g. "(3 + 5) * 2"
    """
    return {"result": str(safe_eval(str(expression)))}


def unit_converter(value: float, from_unit: str, to_unit: str) -> dict:
    """Convert a value between units.

    Args:
        value: the number to convert
        from_unit: the unit of the value, e.g. "km"
        to_unit: the unit to convert to, e.g. "miles"
    """
    factor = UNIT_FACTORS.get(f"{str(from_unit).lower()}_{str(to_unit).lower()}", 1)
    return {"result": round(float(value) * factor, 4)}


def get_current_weather(location: str) -> dict:
    """Get the current weather of a city.

    Args:
        location: the city, e.g. "北京" or "Tokyo"
    """
    temperature, condition = WEATHER.get(location, DEFAULT_WEATHER)
    return {"city": location, "temperature": temperature, "humidity": "65%", "condition": condition}


def get_current_time(timezone: str = "Asia/Shanghai") -> dict:
    """Get the current date and time in a timezone.

    Args:
        timezone: an IANA timezone name, e.g. "Asia/Shanghai"
    """
    return {"datetime": TIMES.get(timezone, DEFAULT_TIME), "timezone": timezone}


def get_exchange_rate(from_currency: str, to_currency: str) -> dict:
    """Get the exchange rate between two currencies.

    Args:
        from_currency: the currency code to convert from, e.g. "USD"
        to_currency: the currency code to convert to, e.g. "CNY"
    """
    return {"from": from_currency, "to": to_currency, "rate": EXCHANGE_RATES.get((from_currency, to_currency), 1.0)}


def translate_text(text: str, target_language: str) -> dict:
    """Translate a text into another language.

    Args:
        text: the text to translate
        target_language: the language to translate into, e.g. "english" or "chinese"
    """
    return {"translated_text": TRANSLATIONS.get((text, target_language), text)}


# --- The registry ------------------------------------------------------------------------------------------------


class ToolTimeout(Exception):
    pass


def _call_with_time_limit(func: Callable[[], Any], seconds: float) -> Any:
    """`func()` or ToolTimeout after `seconds`. In the main thread an alarm interrupts even a busy loop (as the
    original's `signal.alarm`); elsewhere the call runs in a daemon thread that is abandoned when it overruns."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def interrupt(*_):
            raise ToolTimeout()

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return func()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = func()
        except BaseException as error:  # handed to the caller's thread below
            box["error"] = error

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ToolTimeout()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)[:MAX_RESULT_CHARS]


class Tool:
    """A typed function made safe to call from a rollout: `tool(**arguments)` returns a JSON string, always."""

    def __init__(self, func: Callable, name: str | None = None, time_limit: float = TIME_LIMIT_S):
        self.func = func
        self.name = name or func.__name__
        self.time_limit = time_limit
        schema = get_json_schema(func)  # raises for a function without hints or argument descriptions
        schema["function"]["name"] = self.name
        self.schema = schema
        self.signature = inspect.signature(func)
        self.required = list(schema["function"]["parameters"].get("required", []))

    def __call__(self, **arguments: Any) -> str:
        try:
            bound = self.signature.bind(**arguments)
        except TypeError as error:
            return _error(f"bad arguments: {error}")
        try:
            result = _call_with_time_limit(lambda: self.func(*bound.args, **bound.kwargs), self.time_limit)
        except ToolTimeout:
            return _error(f"timed out after {self.time_limit:g} s")
        except Exception as error:  # any failure of the tool is the model's feedback, never the run's end
            return _error(f"{type(error).__name__}: {error}")
        try:
            text = json.dumps(result, ensure_ascii=False)
        except (TypeError, ValueError):
            text = json.dumps(str(result), ensure_ascii=False)
        return text[:MAX_RESULT_CHARS]

    def callable_for_trl(self) -> Callable[..., str]:
        """A function named after the tool that TRL can both describe (`get_json_schema` reads the wrapped
        function's signature and docstring) and call with whatever arguments the model wrote."""

        @functools.wraps(self.func)
        def call(*args: Any, **kwargs: Any) -> str:
            if args:
                return _error("positional arguments are not accepted")
            return self(**kwargs)

        call.__name__ = self.name
        return call

    def valid_arguments(self, arguments: Any) -> bool:
        """The original's `CHECK_ARGS`: every required argument is there and not null or empty."""
        return isinstance(arguments, dict) and all(arguments.get(key) not in (None, "") for key in self.required)


TOOLS: dict[str, Tool] = {}


def register_tool(func: Callable, name: str | None = None, time_limit: float = TIME_LIMIT_S) -> Tool:
    """Add a typed function to the registry under `name` (default: its own name); returns the `Tool`."""
    tool = Tool(func, name, time_limit)
    TOOLS[tool.name] = tool
    return tool


for _func in (calculate_math, unit_converter, get_current_weather, get_current_time, get_exchange_rate, translate_text):
    register_tool(_func)
BUILTIN_TOOLS = tuple(TOOLS)


def resolve_tool(name: str) -> Tool:
    """A registry key, or a `module.function` import path (registered on first use). ValueError otherwise."""
    if name in TOOLS:
        return TOOLS[name]
    module, _, attribute = name.rpartition(".")
    if not module:
        raise ValueError(f"unknown tool {name!r}: one of {', '.join(TOOLS)}, or a module.function path")
    try:
        func = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"tool {name!r} cannot be imported: {error}") from None
    try:
        return register_tool(func)
    except Exception as error:  # transformers' DocstringParsingException / TypeHintParsingException
        raise ValueError(f"tool {name!r} has no usable schema: {' '.join(str(error).split())}") from None


def resolve_tools(names: Sequence[str]) -> list[Tool]:
    return [resolve_tool(name) for name in names]


def run_tool(name: str, arguments: Any, tools: dict[str, Tool] | None = None) -> str:
    """The JSON result of calling tool `name` (among `tools`, default the registry) with `arguments`."""
    tool = (TOOLS if tools is None else tools).get(name)
    if tool is None:
        return NOT_FOUND
    if not isinstance(arguments, dict):
        return _error("arguments must be a JSON object")
    return tool(**arguments)
