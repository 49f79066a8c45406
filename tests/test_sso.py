"""web/sso.py: PKCE, scopes, the key set's cache, and the login's calls against the simulator's SSO and ESI."""
from __future__ import annotations

import base64
import hashlib
import re

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

import esi
from helpers import make_settings
from web import sso


@pytest.fixture
def settings(sim):
    return make_settings("postgresql:///unused", sim.base_url, eve_callback_url="http://127.0.0.1:1/callback",
                         sso_authorize_url=f"{sim.base_url}/v2/oauth/authorize",
                         sso_jwks_url=f"{sim.base_url}/oauth/jwks", sso_revoke_url=f"{sim.base_url}/v2/oauth/revoke")


@pytest.fixture
def client(settings):
    return sso.SsoClient(settings)


def code_for(settings, character_id: int, *, challenge: str, scopes=sso.LOGIN_SCOPES) -> str:
    """The code the simulator's authorize page gives when this pilot is chosen."""
    url = sso.authorize_url(settings, state="s", challenge=challenge, scopes=scopes)
    answer = requests.get(f"{url}&character_id={character_id}", allow_redirects=False, timeout=5)
    return re.search(r"[?&]code=([^&]+)", answer.headers["Location"]).group(1)


def test_the_pkce_challenge_is_unpadded_base64url_of_the_verifiers_sha256():
    verifier, challenge = sso.pkce_pair()
    assert 43 <= len(verifier) <= 128 and re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge)
    assert challenge == sso.code_challenge(verifier) != sso.code_challenge(verifier + "x")
    assert base64.urlsafe_b64decode(challenge + "=") == hashlib.sha256(verifier.encode()).digest()


@pytest.mark.parametrize("claims, scopes", [
    ({"scp": "publicData"}, ("publicData",)),
    ({"scp": ["publicData", sso.CHAR_SCOPE, 7]}, ("publicData", sso.CHAR_SCOPE)),
    ({}, ()),
    ({"scp": {"no": "scope"}}, ()),
])
def test_scopes_come_as_a_string_or_a_list(claims, scopes):
    assert sso.scopes_of(claims) == scopes


def test_the_key_set_is_fetched_once_and_again_for_an_unknown_key_only_after_a_while():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    jwk = dict(jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True), kid="JWT-Signature-Key", alg="RS256")
    fetches, now = [], [0.0]
    keys = sso.KeySet(lambda: fetches.append(1) or {"keys": [jwk, dict(jwk, kid="hmac", kty="oct", k="c2VjcmV0",
                                                                         alg="HS256")]}, clock=lambda: now[0])
    assert keys.key("JWT-Signature-Key").key_id == "JWT-Signature-Key"
    keys.key("JWT-Signature-Key")
    with pytest.raises(sso.TokenRejected):
        keys.key("hmac")  # a shared-secret key is never used to verify
    assert len(fetches) == 1
    now[0] = 61
    with pytest.raises(sso.TokenRejected):
        keys.key("rotated")
    assert len(fetches) == 2


def test_a_code_with_its_verifier_gives_tokens_that_verify(settings, client, sim):
    [pilot] = sim.add_pilots(n_pilots=1, n_killmails=0, revoked=0, corporations=1)
    verifier, challenge = sso.pkce_pair()
    grant = client.exchange_code(code_for(settings, pilot, challenge=challenge), verifier)
    assert client.verify(grant.access_token) == sso.Identity(pilot, "Pilot 1", sso.LOGIN_SCOPES)
    assert esi.token_scopes(grant.access_token) == list(sso.LOGIN_SCOPES)  # the worker reads it unverified
    # The worker's refresh answers are signed the same way.
    refreshed = esi.EsiClient(settings).refresh(grant.refresh_token)
    assert client.verify(refreshed.access_token).character_id == pilot


def test_a_wrong_verifier_or_a_used_code_is_refused(settings, client, sim):
    [pilot] = sim.add_pilots(n_pilots=1, n_killmails=0, revoked=0, corporations=1)
    verifier, challenge = sso.pkce_pair()
    code = code_for(settings, pilot, challenge=challenge)
    with pytest.raises(sso.CodeRefused, match="invalid_grant"):
        client.exchange_code(code, sso.pkce_pair()[0])
    with pytest.raises(sso.CodeRefused):
        client.exchange_code(code, verifier)  # the failed try used it up


def test_revoking_ends_the_grant(settings, client, sim):
    [pilot] = sim.add_pilots(n_pilots=1, n_killmails=0, revoked=0, corporations=1)
    refresh = sim.pilots()[0]["refresh_token"]
    client.revoke(refresh)
    with pytest.raises(esi.InvalidGrant):
        esi.EsiClient(settings).refresh(refresh)


def test_revoking_with_wrong_credentials_names_the_variables(settings, sim):
    wrong = sso.SsoClient(make_settings("postgresql:///unused", sim.base_url, eve_client_secret="nope",
                                        sso_revoke_url=f"{sim.base_url}/v2/oauth/revoke"))
    with pytest.raises(sso.AppRejected, match="EVE_CLIENT_SECRET"):
        wrong.revoke("whatever")


def test_affiliation_and_metadata(client, sim):
    pilots = sim.add_pilots(n_pilots=3, n_killmails=0, revoked=0, corporations=3)
    assert [client.affiliation(p) for p in pilots] == [
        {"corporation_id": 98000001, "alliance_id": 99000001}, {"corporation_id": 98000002, "alliance_id": 99000001},
        {"corporation_id": 98000003, "alliance_id": None}]
    metadata = requests.get(f"{sim.base_url}/.well-known/oauth-authorization-server", timeout=5).json()
    assert metadata["jwks_uri"] == f"{sim.base_url}/oauth/jwks" and metadata["code_challenge_methods_supported"] == \
        ["S256"] and metadata["revocation_endpoint"] == f"{sim.base_url}/v2/oauth/revoke"
