"""devtools/pin_images.py (`make pin-images`): the deploy kit's images pinned by digest, against Docker Hub's API
as `responses` plays it."""
from __future__ import annotations

import pytest
import requests
import responses

import pin_images

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
DOCKERFILE = "# base\nFROM python:3.11-slim AS base\nRUN true\n"
COMPOSE = ("services:\n  postgres:\n    image: postgres:15\n  rabbitmq:\n    image: rabbitmq:3.13-management\n"
           "  mine:\n    image: ghcr.io/me/app:1.0\n")


def registry(digests: dict[str, str]) -> None:
    """Docker Hub's token service and the HEAD of each repository's manifest, answering these digests."""
    responses.add(responses.GET, pin_images.TOKEN_URL, json={"token": "anonymous"})
    for path, digest in digests.items():
        responses.add(responses.HEAD, f"{pin_images.REGISTRY_URL}/v2/{path}",
                      headers={"Docker-Content-Digest": digest})


@responses.activate
def test_every_hub_image_is_pinned_and_keeps_its_tag_and_the_rest_of_its_line():
    registry({"library/python/manifests/3.11-slim": DIGEST})
    text, pinned = pin_images.pin_text(DOCKERFILE, lambda n, t: pin_images.digest_of(requests.Session(), n, t))
    assert text == f"# base\nFROM python:3.11-slim@{DIGEST} AS base\nRUN true\n"
    assert pinned == [f"python:3.11-slim@{DIGEST}"]
    head = next(c.request for c in responses.calls if c.request.method == "HEAD")
    assert head.headers["Authorization"] == "Bearer anonymous"
    assert "manifest.list.v2+json" in head.headers["Accept"]  # every platform's image under the one digest


def test_a_pinned_image_is_repinned_to_what_its_tag_points_at_now_and_other_registries_are_left_alone():
    pinned_once, _ = pin_images.pin_text(COMPOSE, lambda n, t: DIGEST)
    again, images = pin_images.pin_text(pinned_once, lambda n, t: OTHER)
    assert images == [f"postgres:15@{OTHER}", f"rabbitmq:3.13-management@{OTHER}"]
    assert again == COMPOSE.replace(":15\n", f":15@{OTHER}\n").replace("-management\n", f"-management@{OTHER}\n")
    assert "image: ghcr.io/me/app:1.0\n" in again
    assert pin_images.unpinned(again) == [] and pin_images.unpinned(COMPOSE) == ["postgres:15",
                                                                                "rabbitmq:3.13-management"]


@responses.activate
@pytest.mark.parametrize("answer", [dict(status=404), dict(headers={"Docker-Content-Digest": "md5:00"})])
def test_an_answer_without_a_digest_pins_nothing(answer):
    responses.add(responses.GET, pin_images.TOKEN_URL, json={"token": "anonymous"})
    responses.add(responses.HEAD, f"{pin_images.REGISTRY_URL}/v2/library/python/manifests/3.11-slim", **answer)
    with pytest.raises(pin_images.PinError, match="python:3.11-slim"):
        pin_images.pin_text(DOCKERFILE, lambda n, t: pin_images.digest_of(requests.Session(), n, t))


def test_check_names_what_is_not_pinned(tmp_path, monkeypatch, capsys):
    dockerfile, compose = tmp_path / "Dockerfile", tmp_path / "docker-compose.yml"
    dockerfile.write_text(f"FROM python:3.11-slim@{DIGEST}\n")
    compose.write_text(COMPOSE)
    monkeypatch.setattr(pin_images, "ROOT", tmp_path)
    monkeypatch.setattr(pin_images, "FILES", (dockerfile, compose))
    assert pin_images.main(["--check"]) == 1
    assert capsys.readouterr().out.splitlines() == ["not pinned by digest: docker-compose.yml: postgres:15",
                                                    "not pinned by digest: docker-compose.yml: "
                                                    "rabbitmq:3.13-management"]
    compose.write_text(f"services:\n  db:\n    image: postgres:15@{DIGEST}\n")
    assert pin_images.main(["--check"]) == 0
