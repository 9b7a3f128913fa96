"""The agent tool registry: the original's six mocks and tables, a safe evaluator, and tools that fail, hang or
flood, which must give the model an error result and never end the run."""

import json
import time

import pytest

from minimind_hf.agent_tools import (
    BUILTIN_TOOLS,
    MAX_RESULT_CHARS,
    TOOLS,
    Tool,
    register_tool,
    resolve_tool,
    run_tool,
    safe_eval,
)


def result(name: str, **arguments) -> dict:
    return json.loads(run_tool(name, arguments))


def test_the_six_mocks_answer_from_the_originals_tables():
    assert BUILTIN_TOOLS == (
        "calculate_math", "unit_converter", "get_current_weather", "get_current_time", "get_exchange_rate",
        "translate_text",
    )  # fmt: skip
    assert result("calculate_math", expression="(3 + 5) × 2^2") == {"result": "32"}
    assert result("calculate_math", expression="2/3") == {"result": str(2 / 3)}
    assert result("unit_converter", value=10, from_unit="KM", to_unit="miles") == {"result": 6.2137}
    assert result("unit_converter", value=3, from_unit="parsec", to_unit="km") == {"result": 3.0}  # unknown: x1
    assert result("get_current_weather", location="Tokyo") == {
        "city": "Tokyo", "temperature": "12°C", "humidity": "65%", "condition": "晴",
    }  # fmt: skip
    assert result("get_current_weather", location="Atlantis")["temperature"] == "22°C"
    assert result("get_current_time") == {"datetime": "2025-03-07 14:30:00", "timezone": "Asia/Shanghai"}
    assert result("get_current_time", timezone="Asia/Tokyo")["datetime"] == "2025-03-07 15:30:00"
    assert result("get_exchange_rate", from_currency="USD", to_currency="CNY")["rate"] == 7.21
    assert result("get_exchange_rate", from_currency="XXX", to_currency="CNY")["rate"] == 1.0
    assert result("translate_text", text="Happy birthday", target_language="chinese") == {"translated_text": "生日快乐"}
    # The result is JSON as the original writes it (ensure_ascii=False), so Chinese reaches the model as text.
    assert "生日快乐" in run_tool("translate_text", {"text": "Happy birthday", "target_language": "chinese"})


def test_schemas_come_from_signatures_and_docstrings():
    schema = TOOLS["unit_converter"].schema["function"]
    assert schema["name"] == "unit_converter"
    assert schema["parameters"]["properties"]["value"]["type"] == "number"
    assert schema["parameters"]["required"] == ["value", "from_unit", "to_unit"]
    assert TOOLS["get_current_time"].required == []  # a default makes it optional, as the original's schema


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "().__class__.__bases__", "open('x')", "lambda: 1", "[1, 2][0]", "x + 1",
     "9**9**9", "10**100000", "2**(2**20)", "pow(2, 99999)", "math.__dict__", "", "1 +"],
)  # fmt: skip
def test_the_evaluator_refuses_anything_but_arithmetic(expression):
    started = time.monotonic()
    out = result("calculate_math", expression=expression)
    assert set(out) == {"error"} and time.monotonic() - started < 0.5
    with pytest.raises(ValueError):
        safe_eval(expression)


def test_math_functions_and_constants():
    assert safe_eval("sqrt(16) + math.floor(2.7) + abs(-1)") == 7
    assert safe_eval("math.pi") == pytest.approx(3.14159265)
    assert safe_eval("（1 − 4） ÷ 2") == -1.5


def test_failures_become_error_results():
    assert run_tool("launch_rockets", {}) == '{"error": "tool not found"}'
    assert set(result("calculate_math")) == {"error"}  # a required argument missing
    assert set(result("calculate_math", expression="1", colour="red")) == {"error"}  # an argument it does not take
    assert set(json.loads(run_tool("calculate_math", ["1"]))) == {"error"}
    assert set(result("calculate_math", expression="1/0")) == {"error"}


def raises(text: str) -> str:
    """Always fails.

    Args:
        text: anything
    """
    raise RuntimeError(f"broken on {text}")


def hangs(seconds: float) -> str:
    """Sleeps, busily.

    Args:
        seconds: how long
    """
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "woke"


def floods(n: int) -> str:
    """Returns a lot.

    Args:
        n: how many characters
    """
    return "x" * n


def test_user_tools_that_raise_hang_or_flood():
    register_tool(raises)
    register_tool(hangs, time_limit=0.2)
    register_tool(floods)
    assert result("raises", text="a") == {"error": "RuntimeError: broken on a"}
    started = time.monotonic()
    assert result("hangs", seconds=30) == {"error": "timed out after 0.2 s"}
    assert time.monotonic() - started < 2
    assert result("hangs", seconds=0) == "woke"
    assert len(run_tool("floods", {"n": 10_000})) == MAX_RESULT_CHARS


def test_time_limit_off_the_main_thread():
    import threading

    tool = Tool(hangs, time_limit=0.2)
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", tool(seconds=5)))
    worker.start()
    worker.join(3)
    assert json.loads(box["out"]) == {"error": "timed out after 0.2 s"}


def test_tools_by_import_path_and_bad_ones():
    assert resolve_tool("tests.test_agent_tools.floods").name == "floods"
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        resolve_tool("nope")
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_tool("tests.test_agent_tools.missing")
    with pytest.raises(ValueError, match="no usable schema"):
        resolve_tool("json.dumps")


def test_trl_callable_is_described_and_never_raises():
    from transformers.utils import get_json_schema

    call = TOOLS["calculate_math"].callable_for_trl()
    assert call.__name__ == "calculate_math"
    assert get_json_schema(call)["function"]["parameters"]["required"] == ["expression"]
    assert json.loads(call(expression="6*7")) == {"result": "42"}
    assert set(json.loads(call(nonsense=1))) == {"error"}
