"""The suite-wide secret check of conftest.py: a test that leaks a test secret fails."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_a_test_that_leaks_a_secret_fails_and_the_report_does_not_repeat_it():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--show-capture=no",
                             "-rE", "tests/leak_probe.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = sorted(line.split("::")[1].split()[0] for line in result.stdout.splitlines()
                    if line.startswith("ERROR tests/leak_probe.py::"))
    assert errors == ["test_client_secret_in_an_answer", "test_client_secret_in_an_info_line",
                      "test_database_password_in_a_url_printed_whole", "test_inserted_token_in_a_command_output",
                      "test_simulator_token_in_a_traceback",
                      "test_webhook_query_token_in_a_warning"], result.stdout + result.stderr
    assert "7 passed, 6 errors" in result.stdout
    assert "a test secret leaked into a log record" in result.stdout
    assert "a test secret leaked into command output, an answer or a message" in result.stdout
