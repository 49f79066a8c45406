"""`make pin-images`: pin every container image the deploy kit names to the digest its tag points at now.

A tag moves (python:3.11-slim is rebuilt for every Debian security fix); a digest does not, so an image built
twice from the same commit is the same image, and a new base arrives only in a commit that says so. The tag stays
beside the digest, for people: `FROM python:3.11-slim@sha256:...`. Run it again to take the newer base, as
`make lock` does for packages, and commit what changed.

Reads the Dockerfile's FROM lines and the `image:` lines of deploy/docker-compose.yml, asks the image's registry
(Docker Hub's token service and registry API, anonymously) for the digest of each tag's manifest list, and
rewrites the lines in place. `--check` changes nothing and exits 1 when an image is not pinned.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
FILES = (ROOT / "Dockerfile", ROOT / "deploy" / "docker-compose.yml")
TOKEN_URL = "https://auth.docker.io/token"
REGISTRY_URL = "https://registry-1.docker.io"
# The manifest list (every platform's image under one digest) first; a single-platform manifest otherwise.
ACCEPT = ", ".join(("application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json",
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"))
TIMEOUT = 20
# `FROM image:tag[@sha256:...] [AS name]` and `image: image:tag[@sha256:...]`; names with a registry host
# (a dot or a port before the first slash) are not Docker Hub's and are left alone.
IMAGE_LINE = re.compile(r"^(?P<lead>\s*(?:FROM\s+|image:\s*))(?P<name>[a-z0-9][a-z0-9._/-]*):(?P<tag>[\w][\w.-]*)"
                        r"(?:@sha256:[0-9a-f]{64})?(?P<rest>.*)$", re.IGNORECASE)
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class PinError(Exception):
    """The registry did not give a digest for an image."""


def repository(name: str) -> str:
    """Docker Hub's repository for an image name: official images live under library/."""
    return name if "/" in name else f"library/{name}"


def digest_of(session: requests.Session, name: str, tag: str) -> str:
    """The digest the tag points at now, from the registry's answer to a HEAD of its manifest."""
    repo = repository(name)
    token = session.get(TOKEN_URL, params={"service": "registry.docker.io", "scope": f"repository:{repo}:pull"},
                        timeout=TIMEOUT)
    if token.status_code != 200:
        raise PinError(f"{name}:{tag}: the token service answered {token.status_code}")
    answer = session.head(f"{REGISTRY_URL}/v2/{repo}/manifests/{tag}", timeout=TIMEOUT, allow_redirects=False,
                          headers={"Authorization": f"Bearer {token.json()['token']}", "Accept": ACCEPT})
    digest = answer.headers.get("Docker-Content-Digest", "")
    if answer.status_code != 200 or not DIGEST.match(digest):
        raise PinError(f"{name}:{tag}: the registry answered {answer.status_code} without a sha256 digest")
    return digest


def pin_text(text: str, resolve) -> tuple[str, list[str]]:
    """The text with every Docker Hub image line pinned by resolve(name, tag), and the lines' images, pinned."""
    lines, pinned = [], []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        match = IMAGE_LINE.match(body)
        if match is None or "." in match["name"].split("/")[0] or ":" in match["name"]:
            lines.append(line)
            continue
        image = f"{match['name']}:{match['tag']}@{resolve(match['name'], match['tag'])}"
        pinned.append(image)
        lines.append(f"{match['lead']}{image}{match['rest']}" + line[len(body):])
    return "".join(lines), pinned


def unpinned(text: str) -> list[str]:
    """The Docker Hub images the text names by tag alone."""
    found = []
    for line in text.splitlines():
        match = IMAGE_LINE.match(line)
        if match is not None and "@sha256:" not in line and "." not in match["name"].split("/")[0]:
            found.append(f"{match['name']}:{match['tag']}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when an image is not pinned")
    args = parser.parse_args(argv)
    if args.check:
        loose = [f"{path.relative_to(ROOT)}: {image}" for path in FILES for image in unpinned(path.read_text())]
        for line in loose:
            print(f"not pinned by digest: {line}")
        return 1 if loose else 0
    session = requests.Session()
    try:
        for path in FILES:
            text, pinned = pin_text(path.read_text(), lambda name, tag: digest_of(session, name, tag))
            path.write_text(text)
            for image in pinned:
                print(f"{path.relative_to(ROOT)}: {image}")
    except (PinError, requests.RequestException) as exc:
        print(f"pin-images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
