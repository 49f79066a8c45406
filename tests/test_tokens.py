"""tokens.py: refresh tokens sealed with TOKEN_KEY's first key, opened with any, plaintext kept readable."""
from __future__ import annotations

import pytest

from helpers import TOKEN_KEYS
from tokens import PREFIX, TokenKeyError, TokenVault, check_key, is_sealed

NEW, OLD = TOKEN_KEYS
TOKEN = "rTk-2x9QpLmZ4vB7nW1c"  # an SSO refresh token's shape: no colon


def test_without_keys_tokens_are_stored_and_read_as_given():
    vault = TokenVault()
    assert vault.sealing is False
    assert vault.seal(TOKEN) == TOKEN and vault.open(TOKEN) == TOKEN and vault.reseal(TOKEN) == TOKEN


def test_with_a_key_a_token_is_sealed_behind_a_prefix_and_opens_again():
    vault = TokenVault([NEW])
    sealed = vault.seal(TOKEN)
    assert sealed.startswith(PREFIX) and is_sealed(sealed) and TOKEN not in sealed
    assert vault.open(sealed) == TOKEN
    assert vault.seal(TOKEN) != sealed  # Fernet's IV: two seals of one token differ


@pytest.mark.parametrize("stored", [TOKEN, "a-jwt.looking.refresh_token", "", None])
def test_a_plaintext_value_reads_as_it_is_with_a_key(stored):
    assert TokenVault([NEW]).open(stored) == stored


@pytest.mark.parametrize("stored", ["", None])
def test_no_token_is_sealed_as_no_token(stored):
    assert TokenVault([NEW]).seal(stored) == stored


def test_rotation_the_first_key_seals_and_every_key_opens():
    under_old = TokenVault([OLD]).seal(TOKEN)
    rotating = TokenVault([NEW, OLD])
    assert rotating.open(under_old) == TOKEN
    resealed = rotating.reseal(under_old)
    assert TokenVault([NEW]).open(resealed) == TOKEN  # rewritten under the new key alone
    with pytest.raises(TokenKeyError):
        TokenVault([OLD]).open(resealed)


def test_a_plaintext_token_is_sealed_by_reseal():
    resealed = TokenVault([NEW]).reseal(TOKEN)
    assert is_sealed(resealed) and TokenVault([NEW]).open(resealed) == TOKEN


@pytest.mark.parametrize("keys, words", [([OLD], "does not hold"), ([], "TOKEN_KEY is not set")])
def test_a_token_no_key_opens_is_a_clear_error_naming_token_key(keys, words):
    sealed = TokenVault([NEW]).seal(TOKEN)
    with pytest.raises(TokenKeyError, match=words) as caught:
        TokenVault(keys).open(sealed)
    assert "TOKEN_KEY" in str(caught.value) and TOKEN not in str(caught.value)


def test_a_tampered_sealed_value_is_a_key_error_not_a_crash():
    sealed = TokenVault([NEW]).seal(TOKEN)
    with pytest.raises(TokenKeyError):
        TokenVault([NEW]).open(sealed[:-4] + "AAAA")


def test_the_vault_repr_shows_no_key():
    assert NEW not in repr(TokenVault([NEW])) and repr(TokenVault([NEW])) == "TokenVault(sealing=True)"


@pytest.mark.parametrize("key", ["short", "x" * 44, NEW[:-2], ""])
def test_check_key_refuses_what_is_no_fernet_key_without_quoting_it(key):
    with pytest.raises(ValueError) as caught:
        check_key(key)
    assert not key or key not in str(caught.value)
