"""The git helpers of the data plane (docs/dataplane.md)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .core import HttpError
from .processes import user_kwargs

GIT_CRED_HELPER = '!f() { echo username="$WATASU_GIT_USERNAME"; echo password="$WATASU_GIT_PASSWORD"; }; f'


@dataclass
class GitCall:
    """The context of one git route: body, environment, working directory, timeout."""

    body: dict[str, Any]
    env: dict[str, str]
    cwd: str
    timeout: float
    user: str | None

    def arg(self, key: str, required: bool = False) -> Any:
        value = self.body.get(key)
        if required and value in (None, ""):
            raise HttpError(422, "validation_failed", f"{key} is required")
        return value

    def repo(self) -> str:
        """The ``path`` argument, absolute (relative paths resolve against ``cwd``)."""
        path = str(self.arg("path", True))
        return os.path.normpath(path if path.startswith("/") else os.path.join(self.cwd, path))

    def creds(self) -> list[str]:
        """``-c`` options that answer git's credential prompt for this call only."""
        username, password = self.body.get("username"), self.body.get("password")
        if not (username or password):
            return []
        self.env["WATASU_GIT_USERNAME"] = str(username or "git")
        self.env["WATASU_GIT_PASSWORD"] = str(password or "")
        return ["-c", "credential.helper=", "-c", f"credential.helper={GIT_CRED_HELPER}"]

    def run(
        self, argv: list[str], cwd: str | None = None, check: bool = True, stdin: str | None = None
    ) -> dict[str, Any]:
        """Run git; a non-zero exit is a 422 with a code that says why (never 401)."""
        kwargs = user_kwargs(self.user, self.env)
        try:
            p = subprocess.run(
                argv,
                cwd=cwd or self.cwd,
                env=self.env,
                capture_output=True,
                timeout=self.timeout,
                input=stdin.encode() if stdin is not None else None,
                **kwargs,
            )
        except subprocess.TimeoutExpired as e:
            raise HttpError(504, "gateway_timeout", f"git timed out after {self.timeout:g}s") from e
        except FileNotFoundError as e:
            raise HttpError(500, "internal_error", f"cannot run git: {e}") from e
        out = {
            "stdout": p.stdout.decode(errors="replace"),
            "stderr": p.stderr.decode(errors="replace"),
            "command": {"argv": _redact(argv), "exit_code": p.returncode},
        }
        if check and p.returncode != 0:
            raise git_failure(out)
        return out


def _redact(argv: list[str]) -> list[str]:
    return [re.sub(r"//[^/@\s]+@", "//***@", a) for a in argv]


def git_failure(out: dict[str, Any]) -> HttpError:
    """Classify a failed git run: auth, missing upstream, or generic."""
    err = out["stderr"]
    low = err.lower()
    if any(
        s in low
        for s in (
            "authentication failed",
            "could not read username",
            "could not read password",
            "permission denied (publickey)",
            "invalid username or password",
            "terminal prompts disabled",
        )
    ):
        code = "git_auth_failed"
    elif any(
        s in low
        for s in (
            "has no upstream branch",
            "no tracking information",
            "no upstream configured",
            "does not appear to be a git repository",
        )
    ):
        code = "git_upstream_missing"
    else:
        code = "git_command_failed"
    return HttpError(422, code, err.strip() or f"git exited with {out['command']['exit_code']}", {"git": out})


def git_result(path: str | None, out: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """GitResult with every key the SDK may read (unknown ones null)."""
    base: dict[str, Any] = {
        "path": path,
        "stdout": "",
        "stderr": "",
        "url": None,
        "ref": None,
        "branch": None,
        "remote": None,
        "name": None,
        "value": None,
        "branches": [],
        "current_branch": None,
        "command": None,
    }
    if out:
        base.update(out)
    base.update(extra)
    return {"git": base}


def _scope(call: GitCall) -> list[str]:
    scope = call.arg("scope") or ("local" if call.body.get("path") else "global")
    if scope not in ("global", "local", "system", "worktree"):
        raise HttpError(422, "validation_failed", f"bad scope {scope!r}")
    return [f"--{scope}"]


def _config_cwd(call: GitCall) -> str | None:
    return call.repo() if call.body.get("path") else None


def git_clone(call: GitCall) -> dict[str, Any]:
    url = str(call.arg("url", True))
    argv = ["git", *call.creds(), "clone"]
    branch, depth = call.arg("branch"), call.arg("depth")
    if branch:
        argv += ["--branch", str(branch), "--single-branch"]
    if depth:
        argv += ["--depth", str(int(depth))]
    if call.arg("recursive"):
        argv.append("--recurse-submodules")
    path = call.body.get("path")
    if not path:
        path = os.path.basename(url.rstrip("/")).removesuffix(".git") or "repo"
    dest = os.path.normpath(path if str(path).startswith("/") else os.path.join(call.cwd, str(path)))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    out = call.run([*argv, "--", url, dest])
    if call.arg("dangerously_store_credentials") and call.body.get("username"):
        _store_credentials(call, url)
    return git_result(dest, out, url=url, branch=branch)


def _store_credentials(call: GitCall, url: str) -> None:
    parts = urlsplit(url)
    call.run(["git", "config", "--global", "credential.helper", "store"])
    call.run(
        ["git", "credential", "approve"],
        stdin=(
            f"protocol={parts.scheme or 'https'}\nhost={parts.netloc.rsplit('@', 1)[-1]}\n"
            f"username={call.body.get('username')}\npassword={call.body.get('password') or ''}\n\n"
        ),
    )


def git_authenticate(call: GitCall) -> dict[str, Any]:
    call.arg("username", True)
    call.arg("password", True)
    host = call.arg("host") or "github.com"
    _store_credentials(call, f"{call.arg('protocol') or 'https'}://{host}")
    return git_result(None, remote=host)


def git_configure_user(call: GitCall) -> dict[str, Any]:
    name, email = str(call.arg("name", True)), str(call.arg("email", True))
    scope, cwd = _scope(call), _config_cwd(call)
    call.run(["git", "config", *scope, "user.name", name], cwd=cwd)
    out = call.run(["git", "config", *scope, "user.email", email], cwd=cwd)
    return git_result(cwd, out, name=name, value=email)


def git_init(call: GitCall) -> dict[str, Any]:
    path = call.repo()
    os.makedirs(path, exist_ok=True)
    argv = ["git", "init"]
    if call.arg("bare"):
        argv.append("--bare")
    if call.arg("initial_branch"):
        argv.append(f"--initial-branch={call.arg('initial_branch')}")
    return git_result(path, call.run([*argv, path]), branch=call.arg("initial_branch"))


def git_status(call: GitCall) -> dict[str, Any]:
    path = call.repo()
    out = call.run(["git", "status", "--porcelain=v1", "--branch"], cwd=path)
    return git_result(path, out, current_branch=_current_branch(call, path))


def _current_branch(call: GitCall, path: str) -> str | None:
    out = call.run(["git", "branch", "--show-current"], cwd=path, check=False)
    return out["stdout"].strip() or None


def git_branches(call: GitCall) -> dict[str, Any]:
    path = call.repo()
    out = call.run(["git", "branch", "--list", "--format=%(refname:short)"], cwd=path)
    names = [b for b in out["stdout"].splitlines() if b and not b.startswith("(")]
    current = _current_branch(call, path)
    return git_result(path, out, branches=names, current_branch=current, branch=current)


def git_create_branch(call: GitCall) -> dict[str, Any]:
    path, branch = call.repo(), str(call.arg("branch", True))
    out = call.run(["git", "checkout", "-b", branch], cwd=path)
    return git_result(path, out, branch=branch, current_branch=branch)


def git_delete_branch(call: GitCall) -> dict[str, Any]:
    path, branch = call.repo(), str(call.arg("branch", True))
    out = call.run(["git", "branch", "-D" if call.arg("force") else "-d", branch], cwd=path)
    return git_result(path, out, branch=branch)


def git_add(call: GitCall) -> dict[str, Any]:
    path, files = call.repo(), call.arg("files")
    if files:
        argv = ["git", "add", "--", *(str(f) for f in files)]
    elif call.body.get("all", True):
        argv = ["git", "add", "-A"]
    else:
        argv = ["git", "add", "-u"]
    return git_result(path, call.run(argv, cwd=path))


def git_commit(call: GitCall) -> dict[str, Any]:
    path, message = call.repo(), str(call.arg("message", True))
    name, email = call.arg("author_name"), call.arg("author_email")
    if name:
        call.env["GIT_AUTHOR_NAME"] = call.env["GIT_COMMITTER_NAME"] = str(name)
    if email:
        call.env["GIT_AUTHOR_EMAIL"] = call.env["GIT_COMMITTER_EMAIL"] = str(email)
    argv = ["git", "commit", "-m", message]
    if call.arg("allow_empty"):
        argv.append("--allow-empty")
    out = call.run(argv, cwd=path)
    head = call.run(["git", "rev-parse", "HEAD"], cwd=path, check=False)["stdout"].strip()
    return git_result(path, out, ref=head or None, current_branch=_current_branch(call, path))


def git_reset(call: GitCall) -> dict[str, Any]:
    path, mode, target, paths = call.repo(), call.arg("mode"), call.arg("target"), call.arg("paths")
    if paths:
        argv = ["git", "reset", "-q", *([str(target)] if target else []), "--", *(str(p) for p in paths)]
    else:
        if mode and mode not in ("soft", "mixed", "hard", "merge", "keep"):
            raise HttpError(422, "validation_failed", f"bad reset mode {mode!r}")
        argv = ["git", "reset", *([f"--{mode}"] if mode else []), *([str(target)] if target else [])]
    return git_result(path, call.run(argv, cwd=path), ref=target)


def git_restore(call: GitCall) -> dict[str, Any]:
    path, paths = call.repo(), call.arg("paths", True)
    argv = ["git", "restore"]
    if call.arg("staged"):
        argv.append("--staged")
    if call.arg("worktree"):
        argv.append("--worktree")
    if call.arg("source"):
        argv.append(f"--source={call.arg('source')}")
    return git_result(path, call.run([*argv, "--", *(str(p) for p in paths)], cwd=path))


def git_pull(call: GitCall) -> dict[str, Any]:
    path, remote, branch = call.repo(), call.arg("remote"), call.arg("branch")
    argv = ["git", *call.creds(), "pull", "--ff-only"]
    if remote:
        argv.append(str(remote))
        if branch:
            argv.append(str(branch))
    return git_result(path, call.run(argv, cwd=path), remote=remote, branch=branch)


def git_push(call: GitCall) -> dict[str, Any]:
    path, remote, branch = call.repo(), call.arg("remote"), call.arg("branch")
    argv = ["git", *call.creds(), "push"]
    if call.arg("set_upstream"):
        remote = remote or "origin"
        branch = branch or _current_branch(call, path)
        argv.append("--set-upstream")
    if remote:
        argv.append(str(remote))
        if branch:
            argv.append(str(branch))
    return git_result(path, call.run(argv, cwd=path), remote=remote, branch=branch)


def git_checkout(call: GitCall) -> dict[str, Any]:
    path, ref = call.repo(), str(call.arg("ref", True))
    out = call.run(["git", "checkout", ref], cwd=path)
    current = _current_branch(call, path)
    return git_result(path, out, ref=ref, branch=current, current_branch=current)


def git_remote_add(call: GitCall) -> dict[str, Any]:
    path, name, url = call.repo(), str(call.arg("name", True)), str(call.arg("url", True))
    exists = call.run(["git", "remote", "get-url", name], cwd=path, check=False)["command"]["exit_code"] == 0
    if exists and call.arg("overwrite"):
        out = call.run(["git", "remote", "set-url", name, url], cwd=path)
        if call.arg("fetch"):
            out = call.run(["git", "fetch", name], cwd=path)
    else:
        out = call.run(["git", "remote", "add", *(["-f"] if call.arg("fetch") else []), name, url], cwd=path)
    return git_result(path, out, name=name, url=url, remote=name, value=url)


def git_remote_get(call: GitCall) -> dict[str, Any]:
    path, name = call.repo(), str(call.arg("name", True))
    out = call.run(["git", "remote", "get-url", name], cwd=path, check=False)
    url = out["stdout"].strip() if out["command"]["exit_code"] == 0 else None
    return git_result(path, out, name=name, remote=name, url=url, value=url)


def git_set_config(call: GitCall) -> dict[str, Any]:
    key, value = str(call.arg("key", True)), str(call.arg("value", True))
    cwd = _config_cwd(call)
    out = call.run(["git", "config", *_scope(call), key, value], cwd=cwd)
    return git_result(cwd, out, name=key, value=value)


def git_get_config(call: GitCall) -> dict[str, Any]:
    key, cwd = str(call.arg("key", True)), _config_cwd(call)
    out = call.run(["git", "config", *_scope(call), "--get", key], cwd=cwd, check=False)
    code = out["command"]["exit_code"]
    if code not in (0, 1):
        raise git_failure(out)
    return git_result(cwd, out, name=key, value=out["stdout"].rstrip("\n") if code == 0 else None)


GIT_OPS: dict[str, Callable[[GitCall], dict[str, Any]]] = {
    "clone": git_clone,
    "dangerously_authenticate": git_authenticate,
    "configure_user": git_configure_user,
    "init": git_init,
    "status": git_status,
    "branches": git_branches,
    "create_branch": git_create_branch,
    "delete_branch": git_delete_branch,
    "add": git_add,
    "commit": git_commit,
    "reset": git_reset,
    "restore": git_restore,
    "pull": git_pull,
    "push": git_push,
    "checkout": git_checkout,
    "remote_add": git_remote_add,
    "remote_get": git_remote_get,
    "set_config": git_set_config,
    "get_config": git_get_config,
}
