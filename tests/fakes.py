"""Test doubles shared by test files of several folders (``tests/`` is on ``sys.path``, via its conftest)."""

from __future__ import annotations

import threading
from pathlib import Path


class RecordingApi:
    """The three ``HfApi`` methods the uploader calls, recording their arguments; ``create_commit`` fails
    its first ``fail`` calls with ``error`` and waits for ``gate`` when one is given."""

    def __init__(self, fail: int = 0, error: Exception | None = None, gate: threading.Event | None = None):
        self.fail, self.error, self.gate = fail, error or ConnectionError("network is unreachable"), gate
        self.repos: list[tuple[str, dict]] = []
        self.branches: list[tuple[str, dict]] = []
        self.attempts = 0
        self.commits: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.branches.append((repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.attempts += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            self.fail -= 1
            raise self.error
        files = {op.path_in_repo: Path(op.path_or_fileobj) for op in operations}
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
