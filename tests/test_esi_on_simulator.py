"""esi.py over real HTTP against the local ESI simulator, for what test_esi.py can only fake with `responses`: an
error limit reached (420) and its reset, a list whose cache turns over between two pages, and answers that do not
come within the read timeout."""
from __future__ import annotations

import threading

import pytest
import requests

import esi
from esi import ErrorLimited, EsiClient, InvalidHash, ServerError
from helpers import make_settings, wait_until

DETAIL = r"^/killmails/\d+/"


@pytest.fixture
def pilot(sim):
    """One pilot with 25 killmails, its token valid for twenty minutes."""
    sim.add_pilots(n_pilots=1, n_killmails=25, share=1, expired_fraction=0.0, revoked=0, corporations=1)
    return sim.pilots()[0]


def client_of(sim, **overrides) -> EsiClient:
    """A client of the simulator whose backoff waits return at once (the simulator's answers are the test)."""
    return EsiClient(make_settings("postgresql://unused/unused", sim.base_url, **overrides), sleep=lambda s: None)


def newest_first(sim, character_id: int) -> list[tuple[int, str]]:
    """The pilot's list as the simulator holds it now: its killmails, newest first (by time, then id)."""
    bodies = sim.expected_killmails()
    ids = sorted(sim.killmail_ids_for(character_id), key=lambda i: (bodies[i]["killmail_time"], i), reverse=True)
    return [(i, sim.killmail_hash(i)) for i in ids]


def test_the_error_limit_reached_is_error_limited_until_the_reset_esi_gives(sim, pilot):
    sim.configure(error_limit=2, error_window=60)
    sim.advance(60 - sim.now().timestamp() % 60)  # the start of a window: the three calls fall in the same one
    client = client_of(sim)
    killmail_id = min(sim.killmail_ids_for(pilot["character_id"]))
    for _ in range(2):  # two wrong hashes: ESI's 422, each an error of the window
        with pytest.raises(InvalidHash):
            client.get_killmail(killmail_id, "0" * 40)
    with pytest.raises(ErrorLimited) as caught:
        client.get_killmail(killmail_id, sim.killmail_hash(killmail_id))
    assert caught.value.status == 420 and 1 <= caught.value.reset <= 60
    assert sim.stats()["status_420"] == 1  # a 420 is not retried inside the call: that would spend more
    sim.advance(caught.value.reset)  # the reset ESI gave: the next window, with errors to spare
    body, _ = client.get_killmail(killmail_id, sim.killmail_hash(killmail_id))
    assert body["killmail_id"] == killmail_id


def test_a_list_whose_cache_turns_over_between_two_pages_is_walked_again_whole(sim, pilot):
    sim.configure(page_size=10, cache_seconds=300)
    character_id = pilot["character_id"]
    before = newest_first(sim, character_id)
    sim.stall_next(r"/killmails/recent/\?page=2$")  # page 1 answered, page 2 held
    walked = {}
    walker = threading.Thread(target=lambda: walked.update(
        result=client_of(sim).list_recent(character_id=character_id, token=pilot["access_token"])), daemon=True)
    walker.start()
    try:
        wait_until(lambda: sim.stats()["stalled"] == 1, timeout=10, what="page 2 held")
        sim.add_killmails(character_id, 3)  # new kills, and the cache's Expires passes: page 2 comes from a new list
        sim.advance(301)
    finally:
        sim.release_stalls()
    walker.join(timeout=30)
    after = newest_first(sim, character_id)
    assert len(after) == len(before) + 3
    # Page 1 of the old list and page 2 of the new one were not mixed: the walk began again (1, 2; 1, 2, 3).
    assert walked["result"].refs == after and walked["result"].pages == 3
    assert sim.stats()["by_route"]["list_character"] == 5


def test_a_detail_answer_that_does_not_come_within_the_read_timeout_is_asked_again(sim, pilot):
    client = client_of(sim, http_timeout_seconds=2.0)
    killmail_id = min(sim.killmail_ids_for(pilot["character_id"]))
    sim.stall_next(DETAIL)  # the first answer is held past the timeout; the second comes
    try:
        body, _ = client.get_killmail(killmail_id, sim.killmail_hash(killmail_id))
    finally:
        sim.release_stalls()
    assert body["killmail_id"] == killmail_id
    assert sim.stats()["stalled"] == 1 and sim.stats()["by_route"]["detail"] == 2


def test_read_timeouts_on_every_try_end_in_a_server_error_caused_by_the_timeout(sim, pilot):
    client = client_of(sim, http_timeout_seconds=2.0)
    killmail_id = min(sim.killmail_ids_for(pilot["character_id"]))
    sim.stall_next(DETAIL, count=esi.SERVER_RETRIES)
    try:
        with pytest.raises(ServerError) as caught:
            client.get_killmail(killmail_id, sim.killmail_hash(killmail_id))
    finally:
        sim.release_stalls()
    assert isinstance(caught.value.__cause__, requests.ReadTimeout)
    assert sim.stats()["stalled"] == esi.SERVER_RETRIES
    assert client.take_calls()[("killmail", 0)] == esi.SERVER_RETRIES  # counted as answerless calls
