"""The local Hub server works with the real huggingface_hub client and with transformers (127.0.0.1 only)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

import hub_server
from hub_server import LocalHub, use_local_hub


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    yield from hub_server.local_hub_fixture(monkeypatch, tmp_path)


def _assert_port_closed(port: int) -> None:
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_hfapi_upload_list_download_round_trip(local_hub, tmp_path):
    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.token)
    assert api.whoami()["name"] == local_hub.user

    url = api.create_repo("user/demo")
    assert url.repo_id == "user/demo"
    assert url.startswith(local_hub.endpoint)
    api.create_repo("user/demo", exist_ok=True)  # 409 handled by the client
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("user/demo")
    assert excinfo.value.response.status_code == 409

    # Small text file.
    api.upload_file(path_or_fileobj=b"hello hub\n", path_in_repo="notes/hello.txt", repo_id="user/demo")

    # A folder with a >10 MB binary and a real safetensors file.
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "to_upload"
    big = os.urandom(11 * 1024 * 1024)
    _write(folder / "big.bin", big)
    folder.mkdir(exist_ok=True)
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(folder / "model.safetensors"))
    _write(folder / "sub" / "config.json", json.dumps({"a": 1}).encode())
    info = api.upload_folder(folder_path=folder, repo_id="user/demo", commit_message="add folder")
    assert info.oid == local_hub.head("user/demo")

    expected = [".gitattributes", "big.bin", "model.safetensors", "notes/hello.txt", "sub/config.json"]
    assert sorted(api.list_repo_files("user/demo")) == expected
    assert local_hub.repo_files("user/demo") == expected
    # Files are also on disk, at their paths, in the repo folder.
    assert (local_hub.repo_dir("user/demo") / "big.bin").read_bytes() == big

    # Downloads go through HEAD + GET /resolve and land in the (fresh) cache.
    assert constants.HF_HUB_CACHE.startswith(str(tmp_path))
    for name in expected:
        path = hf_hub_download("user/demo", name, endpoint=local_hub.endpoint, token=local_hub.token)
        assert path.startswith(constants.HF_HUB_CACHE)
        local = (folder / name) if (folder / name).exists() else None
        if local is not None:
            assert Path(path).read_bytes() == local.read_bytes()
    assert Path(hf_hub_download("user/demo", "notes/hello.txt")).read_bytes() == b"hello hub\n"
    assert Path(hf_hub_download("user/demo", "big.bin")).read_bytes() == big

    # Metadata endpoints.
    model_info = api.model_info("user/demo")
    assert model_info.id == "user/demo" and model_info.sha == local_hub.head("user/demo")
    assert sorted(s.rfilename for s in model_info.siblings) == expected
    first = local_hub.commits("user/demo")[-1]
    assert [s.rfilename for s in api.model_info("user/demo", revision=first).siblings] == [".gitattributes"]
    tree = {e.path: e for e in api.list_repo_tree("user/demo", recursive=True)}
    assert tree["big.bin"].size == len(big) and "sub" in tree
    assert [e.path for e in api.list_repo_tree("user/demo", path_in_repo="sub")] == ["sub/config.json"]
    assert api.file_exists("user/demo", "big.bin") and not api.file_exists("user/demo", "nope.txt")
    assert api.repo_exists("user/demo") and not api.repo_exists("user/missing")
    paths_info = api.get_paths_info("user/demo", ["sub", "big.bin", "missing"])
    assert [p.path for p in paths_info] == ["sub", "big.bin"]
    assert [c.commit_id for c in api.list_repo_commits("user/demo")] == local_hub.commits("user/demo")

    # Errors the client must map to its own exception types.
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/demo", "adapter_config.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/missing")

    # Uploads really went through the server, inline (no LFS / Xet endpoint was needed).
    assert ("POST", "/api/models/user/demo/preupload/main") in local_hub.requests
    assert ("POST", "/api/models/user/demo/commit/main") in local_hub.requests
    assert ("HEAD", "/user/demo/resolve/main/big.bin") in local_hub.requests
    assert local_hub.unhandled == []


def test_module_level_functions_snapshot_download_and_paging(local_hub):
    # `huggingface_hub.upload_file` & co. use a module-level HfApi: the fixture points it at the server too.
    import huggingface_hub

    huggingface_hub.create_repo("user/snap")
    huggingface_hub.upload_file(path_or_fileobj=b"x" * 10, path_in_repo="a/x.txt", repo_id="user/snap")
    local_hub.commit_files("user/snap", {"b.txt": "b", "a/y.txt": b"y", "c/d/e.txt": "e"})
    local_hub.tree_page_size = 2  # force the client to follow `Link: rel="next"` pages
    files = [".gitattributes", "a/x.txt", "a/y.txt", "b.txt", "c/d/e.txt"]
    assert sorted(huggingface_hub.list_repo_files("user/snap")) == files
    folder = snapshot_download("user/snap")
    downloaded = sorted(
        os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for f in names
    )
    assert downloaded == files
    assert Path(os.path.join(folder, "c", "d", "e.txt")).read_text() == "e"
    assert Path(os.path.join(folder, "a", "x.txt")).read_text() == "x" * 10
    assert local_hub.unhandled == []


def test_upload_folder_as_a_pull_request(local_hub, tmp_path):
    """`upload_folder(create_pr=True)` opens the pull request first (`create_pull_request`), then commits to its ref."""
    api = HfApi()
    api.create_repo("user/proposed")
    folder = tmp_path / "folder"  # not tmp_path itself, which holds the server's storage
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    info = api.upload_folder(repo_id="user/proposed", folder_path=folder, create_pr=True, commit_message="Add a")
    assert info.pr_revision == "refs/pr/1" and local_hub.repo_files("user/proposed") == [".gitattributes"]
    assert local_hub.repo_files("user/proposed", revision="refs/pr/1") == [".gitattributes", "a.txt"]
    details = api.get_discussion_details("user/proposed", 1)
    assert details.is_pull_request and details.title == "Add a" and details.git_reference == "refs/pr/1"


def test_delete_branch_and_pr_commits(local_hub):
    api = HfApi()  # default endpoint and token come from the patched constants / HF_TOKEN
    api.create_repo("user/ops")
    api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id="user/ops")
    api.create_branch("user/ops", branch="dev")
    api.upload_file(path_or_fileobj=b"2", path_in_repo="two.txt", repo_id="user/ops", revision="dev")
    assert local_hub.repo_files("user/ops", revision="dev") == [".gitattributes", "one.txt", "two.txt"]
    assert local_hub.repo_files("user/ops") == [".gitattributes", "one.txt"]
    assert {b.name for b in api.list_repo_refs("user/ops").branches} == {"main", "dev"}

    pr = api.upload_file(path_or_fileobj=b"3", path_in_repo="three.txt", repo_id="user/ops", create_pr=True)
    assert pr.pr_url is not None and pr.pr_revision == "refs/pr/1"
    assert "three.txt" in local_hub.repo_files("user/ops", revision="refs/pr/1")
    path = hf_hub_download("user/ops", "three.txt", revision="refs/pr/1")
    assert Path(path).read_bytes() == b"3"

    api.delete_file("one.txt", repo_id="user/ops")
    assert local_hub.repo_files("user/ops") == [".gitattributes"]
    assert not (local_hub.repo_dir("user/ops") / "one.txt").exists()
    with pytest.raises(EntryNotFoundError):
        api.delete_file("one.txt", repo_id="user/ops")
    api.delete_repo("user/ops")
    assert not local_hub.repo_exists("user/ops")
    assert local_hub.unhandled == []


def test_bad_token_is_rejected(local_hub):
    api = HfApi(endpoint=local_hub.endpoint, token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("user/nope")
    assert excinfo.value.response.status_code == 401
    assert not local_hub.repo_exists("user/nope")


def test_range_requests_and_raw_headers(local_hub):
    local_hub.commit_files("user/raw", {"data.bin": bytes(range(256))})
    conn = http.client.HTTPConnection("127.0.0.1", local_hub.port, timeout=5)
    try:
        conn.request("HEAD", "/user/raw/resolve/main/data.bin")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        assert resp.getheader("Content-Length") == "256"
        assert resp.getheader("X-Repo-Commit") == local_hub.head("user/raw")
        assert resp.getheader("ETag")
        conn.request("GET", "/user/raw/resolve/main/data.bin", headers={"Range": "bytes=10-13"})
        resp = conn.getresponse()
        assert resp.status == 206 and resp.read() == bytes([10, 11, 12, 13])
        assert resp.getheader("Content-Range") == "bytes 10-13/256"
        conn.request("GET", "/user/raw/resolve/main/missing.json")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404 and resp.getheader("X-Error-Code") == "EntryNotFound"
        assert resp.getheader("X-Repo-Commit") == local_hub.head("user/raw")
        conn.request("GET", "/user/raw/resolve/nobranch/data.bin")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404 and resp.getheader("X-Error-Code") == "RevisionNotFound"
        conn.request("GET", "/user/other/resolve/main/data.bin")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404 and resp.getheader("X-Error-Code") == "RepoNotFound"
    finally:
        conn.close()


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # client-side, LFS PUT
def test_lfs_upload_mode_without_xet(monkeypatch, tmp_path):
    # Files >= lfs_threshold are declared "lfs" by preupload: the client then uses the LFS batch API
    # (Xet is disabled by `use_local_hub` in that case, as the server does not implement Xet).
    hub = LocalHub(tmp_path / "storage", lfs_threshold=1024 * 1024)
    with use_local_hub(monkeypatch, tmp_path, hub=hub):
        api = HfApi()
        api.create_repo("user/lfs")
        blob = os.urandom(2 * 1024 * 1024)
        _write(tmp_path / "up" / "weights.bin", blob)
        _write(tmp_path / "up" / "small.txt", b"small")
        api.upload_folder(folder_path=tmp_path / "up", repo_id="user/lfs")
        assert ("POST", "/user/lfs.git/info/lfs/objects/batch") in hub.requests
        tree = {e.path: e for e in api.list_repo_tree("user/lfs")}
        assert tree["weights.bin"].lfs is not None and tree["small.txt"].lfs is None
        assert Path(hf_hub_download("user/lfs", "weights.bin")).read_bytes() == blob
        assert hub.unhandled == []


def test_tiny_bert_push_to_hub_and_from_pretrained(local_hub):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    model = BertModel(config).eval()
    model.push_to_hub("user/tiny")

    files = local_hub.repo_files("user/tiny")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert ("POST", "/api/models/user/tiny/commit/main") in local_hub.requests

    n_before = len(local_hub.requests)
    loaded = BertModel.from_pretrained("user/tiny").eval()
    downloads = [p for m, p in local_hub.requests[n_before:] if m == "GET" and "/resolve/" in p]
    assert "/user/tiny/resolve/" in downloads[0] and any(p.endswith("model.safetensors") for p in downloads)

    input_ids = torch.tensor([[1, 5, 7, 3, 98, 0]])
    with torch.no_grad():
        expected = model(input_ids).last_hidden_state
        actual = loaded(input_ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)

    # Sharded checkpoint: transformers probes `model.safetensors` (404 EntryNotFound, handled), then reads the
    # index and fetches the shards with snapshot_download (tree listing + parallel downloads).
    model.push_to_hub("user/tiny-sharded", max_shard_size="20KB")
    assert "model.safetensors.index.json" in local_hub.repo_files("user/tiny-sharded")
    n_before = len(local_hub.requests)
    sharded = BertModel.from_pretrained("user/tiny-sharded").eval()
    probes = [p for m, p in local_hub.requests[n_before:] if m == "HEAD"]
    assert any(p.endswith("/model.safetensors") for p in probes)
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids).last_hidden_state, expected, rtol=0, atol=0)
    assert local_hub.unhandled == []


def test_patching_is_undone_and_server_stops(tmp_path):
    import huggingface_hub.hf_api

    def state():
        return (
            constants.ENDPOINT,
            constants.HF_HUB_OFFLINE,
            constants.HF_HUB_CACHE,
            os.environ.get("HF_ENDPOINT"),
        )

    before = state()
    with pytest.MonkeyPatch.context() as mp:
        with use_local_hub(mp, tmp_path) as hub:
            port = hub.port
            assert constants.ENDPOINT == hub.endpoint == f"http://127.0.0.1:{port}"
            assert constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"
            assert huggingface_hub.hf_api.api.endpoint == hub.endpoint
            assert HfApi().whoami()["name"] == hub.user
        assert not hub.running
        _assert_port_closed(port)
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None:  # no HfApi bound to the dead endpoint is left behind
            assert transformers_hub._hf_api is None or transformers_hub._hf_api.endpoint != hub.endpoint
    assert state() == before


def test_context_manager_without_patching(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the rest of the suite may run offline
    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("someone/thing")
        assert hub.repo_files("someone/thing") == [".gitattributes"]
        root, port = hub.root, hub.port
    _assert_port_closed(port)
    assert not root.exists()  # temp storage owned by the hub is removed
