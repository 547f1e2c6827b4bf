"""Push each checkpoint's HF export and learning dynamics to a Hugging Face Hub branch, in the background.

Layout, as pico-train's: one branch per run, with one commit per checkpoint that puts the step's files
at the branch root, so the branch head is the latest checkpoint and the commit history holds every step:

```text
<repo>@<branch>/
  config.json, model.safetensors, tokenizer files ...   the step's hf/ export
  learning_dynamics/{train,val}_{activations,weights,gradients}.pt
  config.yaml                                           the step's picomaml config
  training_config.yaml                                  the run's pico-analyze view
```

Commit titles carry pico-train's phrases (``Saving HF Model -- Step 20``, ``Saving Learning Dynamics Data
(val) -- Step 20``), which pico-analyze's remote mode (``--repo_id --branch``) searches for to find a step.
Files of an earlier step that a later step lacks stay on the branch head; the step's own commit is exact.

Uploads run on one worker thread (commits in submission order) and are retried with exponential backoff;
a step that still fails is logged as a warning and kept in [`HubUploader.failures`][picomaml.interop.hub_upload.HubUploader.failures].
Local files are only read, never moved or deleted.

Why a worker thread of its own instead of `huggingface_hub`'s helpers: `CommitScheduler` commits a folder's
state on a timer, not one commit per checkpoint under the titles pico-analyze searches for; and
`HfApi.run_as_future` queues work on a `ThreadPoolExecutor`, whose threads Python joins at exit, so a
stalled upload would keep a finished (or Ctrl-C'd) trainer from exiting. Here the thread is a daemon and
`close` waits a bounded time. Neither helper retries a transient failure or keeps the pending and failed
steps, which the trainer needs: the pruner keeps pending steps' folders and the end-of-run summary reports
the failures.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from picomaml._optional import require
from picomaml.params import ConfigError

__all__ = [
    "HubUploadError",
    "HubUploader",
    "branch_name",
    "checkpoint_folders",
    "commit_title",
    "upload_plan",
    "uploader_from_config",
    "validate_repo_id",
]

log = logging.getLogger(__name__)

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^(?!.*(?:--|\.\.)){_NAME}/{_NAME}$")
_DYNAMICS = re.compile(r"^learning_dynamics/([A-Za-z0-9]+)_(?:(?:activations|weights|gradients)\.pt$|data/)")
_LOGIN = "log in with `hf auth login` (older releases: `huggingface-cli login`) or set HF_TOKEN"


class HubUploadError(ConfigError):
    """The Hub settings cannot work (bad repo id or branch, no token); the message names the setting."""


def validate_repo_id(repo_id: str) -> str:
    """``repo_id`` if it reads ``user/name`` (letters, digits, ``._-``; no ``--``/``..``; <= 96 chars)."""
    if not isinstance(repo_id, str) or len(repo_id) > 96 or not _REPO_ID.match(repo_id):
        raise HubUploadError(
            f"checkpoint.hub_repo: {repo_id!r} is not a Hub repo id of the form 'user/name' (letters, "
            "digits, '.', '_', '-'; no '--' or '..'; at most 96 characters)"
        )
    return repo_id


def branch_name(run_name: str) -> str:
    """A git branch name for a run: characters outside ``[A-Za-z0-9._-]`` become ``-``, runs of ``.``
    shrink to one, leading ``-``/``.`` and a trailing ``.``/``.lock`` are dropped (git check-ref-format)."""
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]", "-", run_name))
    name = name.strip("-.")
    while name.endswith(".lock"):
        name = name[: -len(".lock")].rstrip("-.")
    if not name:
        raise HubUploadError(f"checkpoint.hub_branch: no valid branch name can be made of {run_name!r}")
    return name


def checkpoint_folders(step_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None
                       ) -> dict[str, Path]:  # fmt: skip
    """Repo path -> local path of what a checkpoint pushes, for the parts that exist: the ``hf/`` export at
    the root, ``learning_dynamics/``, the step's ``config.yaml`` and the run's ``training_config.yaml``.

    Args:
        step_dir: ``RUN/checkpoints/step_<N>``.
        run_dir: The run directory; default ``step_dir``'s grandparent.
    """
    step_dir = Path(step_dir)
    run_dir = Path(run_dir) if run_dir is not None else step_dir.parent.parent
    candidates = {
        "": step_dir / "hf",
        "learning_dynamics": step_dir / "learning_dynamics",
        "config.yaml": step_dir / "config.yaml",
        "training_config.yaml": run_dir / "training_config.yaml",
    }
    return {repo: path for repo, path in candidates.items() if path.exists()}


def upload_plan(folders: Mapping[str, str | os.PathLike[str]]) -> list[tuple[str, Path]]:
    """``(path in repo, local file)`` pairs, sorted: a folder's files (recursively, hidden names skipped:
    editor and cache files) go under its key (``""``: the root); a file goes to its key."""
    plan: dict[str, Path] = {}
    for key, local in folders.items():
        local, prefix = Path(local), key.strip("/")
        if local.is_file():
            plan[prefix] = local
            continue
        for path in sorted(local.rglob("*")):
            rel = path.relative_to(local)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                plan["/".join(filter(None, (prefix, rel.as_posix())))] = path
    return sorted(plan.items())


def commit_title(run_name: str, step: int, repo_paths: list[str]) -> str:
    """``"<run> step <N>: "`` and pico-train's phrase for each part present (what pico-analyze matches)."""
    parts = [f"Saving HF Model -- Step {step}"] if "config.json" in repo_paths else []
    splits = sorted({m.group(1) for p in repo_paths if (m := _DYNAMICS.match(p))})
    parts += [f"Saving Learning Dynamics Data ({split}) -- Step {step}" for split in splits]
    return f"{run_name} step {step}" + (": " + "; ".join(parts) if parts else "")


def _suggest(name: object) -> str:
    try:
        return branch_name(str(name))
    except HubUploadError:
        return "run-1"


def _error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    """Client errors (bad token, no access, not found) fail the same way again; everything else may pass."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


class HubUploader:
    """Pushes checkpoints to ``repo_id@branch`` on a worker thread; [`submit`][picomaml.interop.hub_upload.HubUploader.submit] never blocks or raises.

    Args:
        repo_id: ``user/name``; created (private unless ``private=False``) if missing.
        branch: Branch to commit to, created from ``main`` if missing (a valid git branch name).
        run_name: Named in commit titles; default ``branch``.
        token: Hub token; default ``HF_TOKEN`` or the stored login. Needed unless ``api`` is given.
        api: An ``huggingface_hub.HfApi`` (or an object with its ``create_repo``, ``create_branch`` and
            ``create_commit``); default ``HfApi(token=token)``.
        retries: Further attempts after a failed one.
        backoff_s: Wait before the first retry; doubled for each next one.
        private: Visibility of a repo this creates (an existing repo keeps its own).

    Raises:
        HubUploadError: Bad ``repo_id`` or ``branch``, or no token: before any upload is attempted.
    """

    def __init__(
        self, repo_id: str, branch: str, *, run_name: str | None = None, token: str | None = None,
        api: Any = None, retries: int = 3, backoff_s: float = 2.0, private: bool = True,
    ) -> None:  # fmt: skip
        self.repo_id = validate_repo_id(repo_id)
        if not isinstance(branch, str) or branch_name(branch) != branch:
            raise HubUploadError(
                f"checkpoint.hub_branch: {branch!r} is not a valid branch name; use letters, digits, "
                f"'.', '_', '-' (not first), e.g. {_suggest(branch)!r}"
            )
        self.branch, self.run_name = branch, run_name or branch
        self._hub = require("huggingface_hub", "hf", "pushing checkpoints to the Hub")
        if api is None:
            token = token or self._hub.get_token()  # HF_TOKEN, then the stored login
            if not token:
                raise HubUploadError(f"checkpoint.hub_repo={repo_id!r} needs a Hugging Face token: {_LOGIN}")
            api = self._hub.HfApi(token=token)
        self._api, self._retries, self._backoff_s, self._private = api, max(0, retries), backoff_s, private
        self._ready = False  # repo and branch exist (checked once, on the first upload)
        self._lock = threading.Lock()
        self._pending: list[int] = []
        self._failures: list[tuple[int, str]] = []
        self._uploaded: list[int] = []
        self._closed = False
        self._queue: queue.Queue[tuple[int, list[tuple[str, Path]]] | None] = queue.Queue()
        # daemon: an exit without close() must not hang on an upload; the local copy is there anyway
        self._thread = threading.Thread(target=self._work, name=f"hub-upload-{branch}", daemon=True)
        self._thread.start()

    @property
    def failures(self) -> list[tuple[int, str]]:
        """``(step, error text)`` of each step given up on."""
        with self._lock:
            return list(self._failures)

    @property
    def uploaded(self) -> list[int]:
        """Steps pushed, in order."""
        with self._lock:
            return list(self._uploaded)

    @property
    def pending(self) -> list[int]:
        """Steps submitted and not yet pushed or given up on (a pruner should keep their folders)."""
        with self._lock:
            return list(self._pending)

    def submit(self, step: int, folders: Mapping[str, str | os.PathLike[str]]) -> None:
        """Queue one commit of ``folders``: repo path -> local folder or file ([`checkpoint_folders`][picomaml.interop.hub_upload.checkpoint_folders]).

        The file list is taken now; contents are read when the upload runs.
        """
        try:
            plan = upload_plan({k: v for k, v in folders.items() if Path(v).exists()})
        except OSError as exc:
            plan = []
            log.warning("Hub upload of step %d skipped: cannot list its files (%s)", step, _error_text(exc))
        with self._lock:
            if self._closed or not plan:
                log.warning(
                    "Hub upload of step %d skipped: %s", step, "uploader closed" if plan else "no files"
                )
                return
            self._pending.append(step)
        self._queue.put((step, plan))

    def close(self, timeout: float | None = 300.0) -> list[int]:
        """Wait up to ``timeout`` seconds (``None``: no limit) for queued uploads; return the steps that did
        not finish (logged as a warning; their local copies stay)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(timeout)
        left = self.pending
        if left:
            log.warning("Hub upload to %s@%s: steps %s not pushed after %ss; the local checkpoints remain",
                        self.repo_id, self.branch, left, timeout)  # fmt: skip
        return left

    def __enter__(self) -> HubUploader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            step, plan = job
            try:
                self._push_with_retries(step, plan)
                with self._lock:
                    self._uploaded.append(step)
                log.info("Pushed step %d to %s@%s (%d files)", step, self.repo_id, self.branch, len(plan))
            except Exception as exc:  # noqa: BLE001 - an upload must never stop training
                with self._lock:
                    self._failures.append((step, _error_text(exc)))
                log.warning("Hub upload of step %d to %s@%s failed: %s; the local checkpoint is kept",
                            step, self.repo_id, self.branch, _error_text(exc))  # fmt: skip
            finally:
                with self._lock:
                    self._pending.remove(step)

    def _push_with_retries(self, step: int, plan: list[tuple[str, Path]]) -> None:
        for attempt in range(self._retries + 1):
            try:
                return self._push(step, plan)
            except Exception as exc:
                if attempt == self._retries or not _retryable(exc):
                    raise
                wait = self._backoff_s * 2**attempt
                log.info("Hub upload of step %d failed (%s); retry %d/%d in %.3gs",
                         step, _error_text(exc), attempt + 1, self._retries, wait)  # fmt: skip
                time.sleep(wait)

    def _push(self, step: int, plan: list[tuple[str, Path]]) -> None:
        if not self._ready:
            self._api.create_repo(self.repo_id, private=self._private, exist_ok=True)
            self._api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
            self._ready = True
        add = self._hub.CommitOperationAdd  # reads each file now, at upload time
        self._api.create_commit(
            self.repo_id,
            [add(path_in_repo=repo, path_or_fileobj=str(path)) for repo, path in plan],
            commit_message=commit_title(self.run_name, step, [repo for repo, _ in plan]),
            commit_description=f"picomaml run {self.run_name!r}, step {step}: {len(plan)} files",
            revision=self.branch,
        )


def uploader_from_config(
    checkpoint_cfg: Any, run_dir: str | os.PathLike[str], **kwargs: Any
) -> HubUploader | None:
    """A [`HubUploader`][picomaml.interop.hub_upload.HubUploader] for ``checkpoint.hub_repo`` (``None`` when unset) on ``checkpoint.hub_branch``
    or, when that is null, the run directory's name made a branch name ([`branch_name`][picomaml.interop.hub_upload.branch_name]).

    Args:
        checkpoint_cfg: The ``checkpoint`` config section.
        run_dir: The run directory.
        **kwargs: Passed on to [`HubUploader`][picomaml.interop.hub_upload.HubUploader] (``token``, ``api``, ``retries``, ...).
    """
    if not checkpoint_cfg.hub_repo:
        return None
    run_name = Path(run_dir).resolve().name
    branch = checkpoint_cfg.hub_branch or branch_name(run_name)
    return HubUploader(checkpoint_cfg.hub_repo, branch, run_name=run_name, **kwargs)
