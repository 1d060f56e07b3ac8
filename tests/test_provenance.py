"""What produced an artifact: the code's version and the commit to cite, from a checkout or an installed copy."""

from __future__ import annotations

import json

import pytest

from diffusets_jax import provenance


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """An installed copy: no checkout around the package; its `direct_url.json` as the test sets it (None: none)."""
    monkeypatch.setattr(provenance, "_checkout", lambda: tmp_path)
    provenance.code_version.cache_clear()
    yield lambda direct_url: monkeypatch.setattr(
        provenance, "_direct_url", lambda: None if direct_url is None else json.dumps(direct_url))
    provenance.code_version.cache_clear()


def test_a_git_install_records_the_commit_pip_installed(installed):
    """`pip install git+URL` has no checkout to ask: models, datasets and runs it made recorded no commit to cite."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    installed({"url": "https://example.org/diffusets-jax.git",
               "vcs_info": {"vcs": "git", "commit_id": commit, "requested_revision": "main"}})
    code = provenance.code_version()
    assert (code["git_commit"], code["git_dirty"]) == (commit, False)
    assert provenance.stamp()["code"]["git_commit"] == commit


@pytest.mark.parametrize("direct_url", [
    None,  # a wheel from an index: no direct_url.json
    {"url": "file:///home/me/diffusets-jax", "dir_info": {}},  # `pip install .`
    {"url": "https://example.org/x.hg", "vcs_info": {"vcs": "hg", "commit_id": "abc"}},  # not git
])
def test_other_installs_record_no_commit(installed, direct_url):
    installed(direct_url)
    code = provenance.code_version()
    assert (code["git_commit"], code["git_dirty"]) == (None, None)


def test_a_checkout_records_its_head():
    provenance.code_version.cache_clear()
    code = provenance.code_version()
    if not (provenance._checkout() / ".git").exists():
        pytest.skip("not run from a git checkout")
    assert code["git_commit"] and len(code["git_commit"]) == 40 and code["git_dirty"] in (True, False)
