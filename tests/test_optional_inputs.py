"""tests/conftest.py `require` / `missing`: an optional test input that is absent skips
the test, except under CI, where it fails it."""

import pytest
from conftest import missing, require


@pytest.mark.parametrize("value", ["", "0", "false", "No"])
def test_absent_module_skips_outside_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="no_such_module_for_flaxlm"):
        require("no_such_module_for_flaxlm")


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_absent_module_or_file_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"no_such_module_for_flaxlm.*\[hf\]"):
        require("no_such_module_for_flaxlm")
    with pytest.raises(pytest.fail.Exception, match=r"model\.gguf is missing"):
        missing("model.gguf", "pip install it")


def test_present_module_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require("json").dumps([1]) == "[1]"
