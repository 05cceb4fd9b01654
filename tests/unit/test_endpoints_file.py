"""The workers file the router and the balancer follow under `triphase up --autoscale`."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from triphase.common.process.endpoints_file import follow, read_endpoints, write_endpoints


def test_endpoints_are_read_sorted_and_deduplicated(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "workers.txt"
    path.write_text("# workers\n127.0.0.1:9002\n\n127.0.0.1:9001  # the first\n127.0.0.1:9002\n")
    assert read_endpoints(path) == ["127.0.0.1:9001", "127.0.0.1:9002"]


@pytest.mark.parametrize("line", ["localhost", ":9000", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_line_that_is_not_host_port_is_an_error_naming_it(tmp_path: pathlib.Path, line: str) -> None:
    path = tmp_path / "workers.txt"
    path.write_text(f"127.0.0.1:9001\n{line}\n")
    with pytest.raises(ValueError, match=f"workers.txt:2: expected host:port, got {line!r}"):
        read_endpoints(path)


def test_following_sees_each_change_once_and_keeps_the_last_good_list(tmp_path: pathlib.Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "workers.txt"
    write_endpoints(path, ["127.0.0.1:9001"])
    seen: list[list[str]] = []

    async def scenario() -> None:
        task = asyncio.create_task(follow(path, seen.append, poll_s=0.01))
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)  # polling for the watcher's first report, bounded
        write_endpoints(path, ["127.0.0.1:9001", "127.0.0.1:9002"])
        for _ in range(200):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        path.write_text("not an endpoint\n")  # a bad edit keeps what was there
        for _ in range(200):
            if "expected host:port" in caplog.text:
                break
            await asyncio.sleep(0.01)  # polling for the watcher's warning, bounded
        path.unlink()  # and so does a missing file
        for _ in range(200):
            if "No such file" in caplog.text:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        assert "expected host:port" in caplog.text and "No such file" in caplog.text

    asyncio.run(scenario())
    assert seen == [["127.0.0.1:9001"], ["127.0.0.1:9001", "127.0.0.1:9002"]]
