"""README.md is for users: the two commands first, every setting in its table, short, the benchmark linked."""
from __future__ import annotations

import re

from helpers import ROOT
from settings import settings_from

README = (ROOT / "README.md").read_text()
PROXY_VARIABLES = {"HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"}  # matched by name, in either case


class Recording(dict):
    """An environment that remembers every variable read from it."""

    def __init__(self, values: dict[str, str]):
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def section(heading: str) -> str:
    """The README's text under a heading, up to the next heading of any level."""
    start = README.index(f"\n{heading}\n")
    end = README.find("\n#", start + len(heading) + 2)
    return README[start:end if end != -1 else None]


def test_every_setting_read_is_in_the_configuration_table():
    env = Recording({"ESI_USER_AGENT": "killmail-worker/1.0 (ops@example.org)", "EVE_CLIENT_ID": "id",
                     "EVE_CLIENT_SECRET": "secret", "EVE_CALLBACK_URL": "https://killmails.example.org/callback",
                     "FLASK_SECRET_KEY": "k" * 32})
    settings_from(env)
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", "\n".join(
        line.split("|")[1] for line in section("## Configuration").splitlines() if line.startswith("| `"))))
    assert len(env.read) > 20 and env.read | PROXY_VARIABLES <= documented


def test_the_two_commands_come_first_and_the_sections_users_need_follow():
    first_block = README.split("```")[1]
    assert README.index("```") < README.index("\n## ")
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]
    for heading in ("## Adding a pilot", "## Configuration", "## Running in production",
                    "### Scaling out: from one host to three", "### Limits and how throughput scales"):
        assert section(heading)


def test_the_readme_is_short_and_links_the_benchmarks_method():
    assert len(README.encode()) <= 15 * 1024  # 13 KiB, 1 KiB for security, 1 KiB for the stop and the watchdog
    benchmark = section("## Benchmark")
    assert "](bench/README.md)" in benchmark and "| scenario | result | target |" in benchmark


def test_the_security_section_lists_what_an_operator_must_set():
    security = section("### Security: what to set, and what the app refuses without it")
    for needed in ("`STATUS_BASIC_AUTH`", "`STATUS_AUTH_BY_PROXY=1`", "`EVE_CALLBACK_URL`", "403", "chmod 640",
                   "sslmode=verify-full", "amqps://", "`Origin: <the app's origin>`", "network-policy.yaml",
                   "ingress.yaml.example", "postgresql/status-role.sql", "`TOKEN_KEY`", "--seal-tokens",
                   "`TOKEN_KEY=new,old`"):
        assert needed in security, needed
