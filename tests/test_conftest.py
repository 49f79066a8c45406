"""The suite-wide secret check of conftest.py: a test that leaks a test secret fails."""
from __future__ import annotations

import ast
import subprocess
import sys

from helpers import ROOT


def test_a_test_that_leaks_a_secret_fails_and_the_report_does_not_repeat_it():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--show-capture=no",
                             "-rE", "tests/leak_probe.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = sorted(line.split("::")[1].split()[0] for line in result.stdout.splitlines()
                    if line.startswith("ERROR tests/leak_probe.py::"))
    assert errors == ["test_client_secret_in_an_answer", "test_client_secret_in_an_info_line",
                      "test_database_password_in_a_url_printed_whole", "test_inserted_token_in_a_command_output",
                      "test_simulator_token_in_a_traceback", "test_webhook_query_token_in_a_warning",
                      "test_webhook_token_in_a_line_read_from_a_pipe"], result.stdout + result.stderr
    assert "8 passed, 7 errors" in result.stdout
    assert "a test secret leaked into a log record" in result.stdout
    assert "a test secret leaked into command output, an answer or a message" in result.stdout


def test_every_test_imports_conftest_and_helpers_by_one_name():
    """`tests.conftest` or `tests.helpers` would be a second copy of the module, with a list of watched secrets of
    its own that the leak check never reads; and pytest's fixtures are no module to import at all."""
    imported = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            imported.update({f"{path.relative_to(ROOT)}: {name}": name for name in names})
    assert imported and not [where for where, name in imported.items()
                             if name.split(".")[-1] == "conftest" or name.startswith("tests.")]
