"""Per-client API tokens: the clients file, its re-reading, the CLI that edits it, and the reserved label.

The HTTP side (a real API process following the file as it is edited) is in
``tests/test_api.py``; these are the parts that need no server.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.errors import ConfigurationError, InputError
from producer.api_clients import (
    SHARED_TOKEN_CLIENT,
    ApiClient,
    ClientRegistry,
    add_client,
    parse_clients,
    remove_client,
    token_digest,
)

DIGEST = token_digest("a-token")


def test_the_clients_file_is_parsed_with_comments_and_scopes() -> None:
    text = f"# name digest scope\n\ningest {DIGEST} submit  # the nightly importer\ngrafana {token_digest('b')} read\n"
    assert parse_clients(text) == {DIGEST: ApiClient("ingest", "submit"),
                                   token_digest("b"): ApiClient("grafana", "read")}


def test_limits_follow_the_scope() -> None:
    text = (f"web {DIGEST} submit max_priority=4 window=2\nbulk {token_digest('b')} submit window=8\n"
            f"private {token_digest('c')} read see=own\n")
    clients = parse_clients(text)
    web, bulk = clients[DIGEST], clients[token_digest("b")]
    assert web.sees_all and not clients[token_digest("c")].sees_all and ApiClient(None, see="own").sees_all
    assert (web.max_priority, web.window, bulk.max_priority, bulk.window) == (4, 2, None, 8)
    assert [web.limited_window(asked) for asked in (None, 0, 1, 2, 5)] == [2, 2, 1, 2, 2]
    assert [ApiClient("open").limited_window(asked) for asked in (None, 0, 5)] == [None, 0, 5]


@pytest.mark.parametrize("line, reason", [
    (f"ingest {DIGEST} submit max_priority=10", "max_priority=10: expected a whole number from 0 to 9"),
    (f"ingest {DIGEST} submit window=0", "window=0: expected a whole number from 1"),
    (f"ingest {DIGEST} submit quota=5", "a field after the scope is not a limit"),
    (f"ingest {DIGEST} submit window=2 window=3", "window is given twice"),
    (f"ingest {DIGEST} submit see=some", "see=some: expected see=own"),
    ("ingest sha256:abc submit", "the second field is not a token digest"),
    (f"ingest {DIGEST}", "got 2 fields"),
    (f"ingest {DIGEST} admin", "the third field is not a scope: use one of submit, read"),
    (f"-ingest {DIGEST} submit", "the first field is not a client name"),
    (f"ingest {DIGEST} dbl_pastedtoken", "the third field is not a scope"),  # no field is quoted back
    (f"ingest {DIGEST} submit dbl_pasted", "a field after the scope is not a limit"),
    (f"ingest {DIGEST.upper()} submit", "the second field is not a token digest"),
    ("ingest dbl_pastedtoken submit", "the second field is not a token digest"),
])
def test_a_bad_line_is_refused_with_its_number(line: str, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=r"clients, line 2: .*" + reason.replace("(", r"\(")) as refused:
        parse_clients(f"ok {token_digest('x')} read\n{line}\n", source="clients")
    assert "pasted" not in str(refused.value)


def test_a_file_that_starts_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A Windows editor saves the file with a byte-order mark; it once refused every client."""
    path = tmp_path / "clients"
    path.write_text(f"ingest {token_digest('t')} submit\n", encoding="utf-8-sig")
    assert ClientRegistry(path).authenticate("t").name == "ingest"


def test_a_name_or_token_declared_twice_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="line 2: client 'a' is declared twice"):
        parse_clients(f"a {DIGEST} read\na {token_digest('b')} read\n")
    with pytest.raises(ConfigurationError, match="line 2: the same token is declared for 'a' already"):
        parse_clients(f"a {DIGEST} read\nb {DIGEST} read\n")


def test_add_and_remove_keep_the_file_private_and_whole(tmp_path: Path) -> None:
    path = tmp_path / "clients"
    token = add_client(path, "ingest")
    assert token.startswith("dbl_") and len(token) == 47
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text(), "only the digest is stored"
    other = add_client(path, "grafana", scope="read")
    assert parse_clients(path.read_text()) == {token_digest(token): ApiClient("ingest", "submit"),
                                               token_digest(other): ApiClient("grafana", "read")}
    with pytest.raises(InputError, match="has a client 'ingest' already"):
        add_client(path, "ingest")
    path.chmod(0o640)  # an operator let the API's group read it
    assert remove_client(path, "ingest") and not remove_client(path, "ingest")
    assert parse_clients(path.read_text()) == {token_digest(other): ApiClient("grafana", "read")}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640, "the rewrite keeps the file's mode"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".clients.lock", "clients"], "no temporary file is left"


def test_edits_at_once_lose_nothing(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "clients"
    with ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(lambda i: add_client(path, f"client-{i}"), range(32)))
    assert set(parse_clients(path.read_text())) == {token_digest(t) for t in tokens}


def test_the_registry_follows_the_file_and_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import producer.api_clients as api_clients

    monkeypatch.setattr(api_clients, "RECHECK_S", 0.0)  # re-read on every request
    path = tmp_path / "clients"
    token = add_client(path, "ingest")
    registry = ClientRegistry(path, shared_token="shared")
    assert registry.required
    assert registry.authenticate(token) == ApiClient("ingest", "submit")
    assert registry.authenticate("shared") is SHARED_TOKEN_CLIENT
    assert registry.authenticate("guess") is None and registry.authenticate(token + "x") is None

    later = add_client(path, "later", scope="read")
    assert registry.authenticate(later) == ApiClient("later", "read")
    path.write_text(path.read_text() + "broken\n")
    with pytest.raises(ConfigurationError, match="line 3"):
        registry.authenticate(token)  # nobody gets in while the file is broken
    assert registry.authenticate("shared") is SHARED_TOKEN_CLIENT  # the shared token does not depend on the file
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    assert registry.authenticate(token) == ApiClient("ingest", "submit")
    path.unlink()
    with pytest.raises(ConfigurationError, match="cannot read"):
        registry.authenticate(token)

    with pytest.raises(ConfigurationError, match="cannot read"):
        ClientRegistry(tmp_path / "missing")  # refused at start-up, not at the first request
    assert not ClientRegistry(None).required


def test_the_api_client_label_is_set_by_the_api_only() -> None:
    from jobs.labels import MAX_LABELS, check_submitted_labels

    assert check_submitted_labels({"team": "a"}, "ingest") == {"team": "a", "api-client": "ingest"}
    assert check_submitted_labels({"team": "a"}) == {"team": "a"}
    with pytest.raises(InputError, match="set by the HTTP API"):
        check_submitted_labels({"api-client": "someone"})
    with pytest.raises(InputError, match=f"at most {MAX_LABELS - 1} labels"):
        check_submitted_labels({f"k{i}": "v" for i in range(MAX_LABELS)}, "ingest")


def test_api_client_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.cli import main

    path = tmp_path / "clients"
    monkeypatch.setenv("DEBLUR_API_CLIENTS", str(path))
    runner = CliRunner()
    added = runner.invoke(main, ["api-client", "add", "ingest"])
    assert added.exit_code == 0, added.output
    token = added.stdout.strip()
    assert parse_clients(path.read_text()) == {token_digest(token): ApiClient("ingest", "submit")}
    assert runner.invoke(main, ["api-client", "add", "grafana", "--read-only"]).exit_code == 0
    assert runner.invoke(main, ["api-client", "add", "web", "--max-priority", "4", "--window", "2",
                                "--own-jobs-only"]).exit_code == 0
    listed = runner.invoke(main, ["api-client", "list"])
    assert [line.split("\t")[:3] for line in listed.stdout.splitlines()] == [
        ["grafana", "read", "-"], ["ingest", "submit", "-"], ["web", "submit", "max_priority=4 window=2 see=own"]]
    assert runner.invoke(main, ["api-client", "add", "x", "--max-priority", "12"]).exit_code == 2
    assert token not in listed.output
    again = runner.invoke(main, ["api-client", "add", "ingest"])
    assert again.exit_code == 2 and "remove it first" in again.output
    assert runner.invoke(main, ["api-client", "remove", "ingest"]).exit_code == 0
    missing = runner.invoke(main, ["api-client", "remove", "ingest"])  # the user's input: exit 2, as elsewhere
    assert missing.exit_code == 2 and "error:" in missing.output and "no client 'ingest'" in missing.output
    for command in ("list", "remove x"):  # a mistyped --file is not a file without clients
        elsewhere = runner.invoke(main, ["api-client", *command.split(), "--file", str(tmp_path / "nodir" / "c")])
        assert elsewhere.exit_code == 2 and f"{tmp_path / 'nodir' / 'c'} does not exist" in elsewhere.output
    (tmp_path / "empty").write_text("")
    empty = runner.invoke(main, ["api-client", "list", "--file", str(tmp_path / "empty")])
    assert empty.exit_code == 0 and "no clients in" in empty.output

    monkeypatch.delenv("DEBLUR_API_CLIENTS")
    unset = runner.invoke(main, ["api-client", "add", "x"])
    assert unset.exit_code == 2 and "set DEBLUR_API_CLIENTS" in unset.output

    path.write_text("garbage\n")
    monkeypatch.setenv("DEBLUR_API_CLIENTS", str(path))
    serve = runner.invoke(main, ["api", "--port", "1"])
    assert serve.exit_code == 2 and "line 1" in serve.output and "Mend the file" in serve.output
