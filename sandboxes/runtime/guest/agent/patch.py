"""``apply_diff``: the apply_patch document format and unified diffs (through git apply)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .core import HttpError
from .files import ensure_parent


class PatchError(Exception):
    """The patch document cannot be parsed (422 patch_parse_failed)."""


@dataclass
class Hunk:
    """One ``@@`` block: the lines it expects (``old``) and their replacement (``new``)."""

    hint: str
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    eof: bool = False
    plus: int = 0
    minus: int = 0


@dataclass
class PatchOp:
    kind: str  # add | update | delete | move
    path: str
    move_to: str | None = None
    content: list[str] = field(default_factory=list)
    hunks: list[Hunk] = field(default_factory=list)


def parse_apply_patch(text: str) -> list[PatchOp]:
    """Parse the "ApplyPatch" envelope (``*** Begin Patch`` ... ``*** End Patch``)."""
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[0].strip() != "*** Begin Patch":
        raise PatchError("patch must start with '*** Begin Patch'")
    if lines[-1].strip() != "*** End Patch":
        raise PatchError("patch must end with '*** End Patch'")
    ops: list[PatchOp] = []
    body, i = lines[1:-1], 0
    while i < len(body):
        line = body[i]
        if line.startswith("*** Add File: "):
            op = PatchOp("add", line[len("*** Add File: ") :].strip())
            i += 1
            while i < len(body) and not body[i].startswith("*** "):
                if not body[i].startswith("+"):
                    raise PatchError(f"line {i + 2}: added file lines must start with '+'")
                op.content.append(body[i][1:])
                i += 1
            ops.append(op)
        elif line.startswith("*** Delete File: "):
            ops.append(PatchOp("delete", line[len("*** Delete File: ") :].strip()))
            i += 1
        elif line.startswith("*** Update File: "):
            op = PatchOp("update", line[len("*** Update File: ") :].strip())
            i += 1
            if i < len(body) and body[i].startswith("*** Move to: "):
                op.kind, op.move_to = "move", body[i][len("*** Move to: ") :].strip()
                i += 1
            i = _parse_hunks(body, i, op)
            ops.append(op)
        elif not line.strip():
            i += 1
        else:
            raise PatchError(f"line {i + 2}: unexpected {line[:60]!r}")
    if not ops:
        raise PatchError("patch contains no file operations")
    return ops


def _parse_hunks(body: list[str], i: int, op: PatchOp) -> int:
    hunk: Hunk | None = None
    while i < len(body):
        line = body[i]
        if line.startswith("*** End of File"):
            if hunk is not None:
                hunk.eof = True
            i += 1
            continue
        if line.startswith("*** "):
            break
        if line.startswith("@@"):
            hunk = Hunk(line[2:].strip().removesuffix("@@").strip())
            op.hunks.append(hunk)
        else:
            if hunk is None:
                hunk = Hunk("")
                op.hunks.append(hunk)
            tag, rest = (line[:1], line[1:]) if line else (" ", "")
            if tag == " ":
                hunk.old.append(rest)
                hunk.new.append(rest)
            elif tag == "-":
                hunk.old.append(rest)
                hunk.minus += 1
            elif tag == "+":
                hunk.new.append(rest)
                hunk.plus += 1
            else:
                raise PatchError(f"bad hunk line {line[:60]!r} in {op.path}")
        i += 1
    if op.kind == "update" and not op.hunks:
        raise PatchError(f"update of {op.path} has no hunks")
    return i


def _find(lines: list[str], seq: list[str], start: int, eof: bool) -> int:
    """Index where ``seq`` occurs at/after ``start``: exact, then ignoring trailing, then all blanks."""
    if not seq:
        return len(lines) if eof else start
    for norm in (lambda s: s, str.rstrip, str.strip):
        target = [norm(s) for s in seq]
        candidates = [len(lines) - len(seq)] if eof else range(start, len(lines) - len(seq) + 1)
        for k in candidates:
            if k >= 0 and [norm(s) for s in lines[k : k + len(seq)]] == target:
                return k
    return -1


def apply_hunks(text: str, hunks: list[Hunk]) -> tuple[str, int, int]:
    """Apply hunks in order; returns (new text, added, removed) or raises ValueError(index, msg)."""
    trailing_nl = text.endswith("\n") or not text
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    pos, added, removed = 0, 0, 0
    for n, h in enumerate(hunks):
        start = pos
        if h.hint:
            k = _find(lines, [h.hint], pos, False)
            if k >= 0:
                start = k + 1 if h.hint.strip() not in (s.strip() for s in h.old[:1]) else k
        k = _find(lines, h.old, start, h.eof)
        if k < 0 and start != pos:
            k = _find(lines, h.old, pos, h.eof)
        if k < 0:
            raise ValueError(n, f"hunk {n} did not match", pos + 1)
        lines[k : k + len(h.old)] = h.new
        pos = k + len(h.new)
        added, removed = added + h.plus, removed + h.minus
    out = "\n".join(lines)
    return (out + "\n" if trailing_nl and lines else out), added, removed


def apply_patch_document(text: str, cwd: str) -> dict[str, Any]:
    """Apply an ApplyPatch document file by file; a failed file is reported, the rest applied."""
    try:
        ops = parse_apply_patch(text)
    except PatchError as e:
        raise HttpError(422, "patch_parse_failed", str(e)) from e
    files, applied, failed, touched = [], [], [], []

    def resolve(p: str) -> str:
        return os.path.normpath(p if p.startswith("/") else os.path.join(cwd, p))

    for op in ops:
        shown = op.move_to or op.path
        try:
            added, removed = _apply_op(op, resolve)
        except ValueError as e:
            index, msg, line = e.args if len(e.args) == 3 else (0, str(e), None)
            failed.append(
                {
                    "path": op.path,
                    "error": msg,
                    "failed_hunk": {"index": index, "old_start": line} if line else None,
                }
            )
            continue
        except (OSError, HttpError) as e:
            failed.append({"path": op.path, "error": getattr(e, "message", None) or str(e)})
            continue
        files.append(
            {
                "path": shown,
                "kind": op.kind,
                "added": added,
                "removed": removed,
                "source_path": op.path if op.kind == "move" else None,
            }
        )
        applied.append(shown)
        touched.extend([op.path, shown] if op.kind == "move" else [shown])
    status = "applied" if not failed else "failed" if not applied else "partial"
    return {
        "status": status,
        "parsed_diff_blocks": len(ops),
        "patches": len(ops),
        "files": files,
        "summary": {"requested": len(ops), "applied": len(applied), "failed": len(failed)},
        "applied": applied,
        "failed": failed,
        "touched": touched,
    }


def _apply_op(op: PatchOp, resolve: Callable[[str], str]) -> tuple[int, int]:
    src = resolve(op.path)
    if op.kind == "add":
        content = "\n".join(op.content) + ("\n" if op.content else "")
        ensure_parent(src)
        with open(src, "w") as f:
            f.write(content)
        return len(op.content), 0
    if op.kind == "delete":
        with open(src) as f:
            removed = f.read().count("\n")
        os.unlink(src)
        return 0, removed
    with open(src) as f:
        text = f.read()
    new, added, removed = apply_hunks(text, op.hunks)
    dst = resolve(op.move_to) if op.move_to else src
    ensure_parent(dst)
    with open(dst, "w") as f:
        f.write(new)
    if dst != src:
        os.unlink(src)
    return added, removed


def apply_unified_diff(text: str, cwd: str, env: dict[str, str]) -> dict[str, Any]:
    """git-style unified diffs are handed to ``git apply`` (optional in the spec)."""
    stat_run = subprocess.run(
        ["git", "apply", "--numstat", "-"],
        input=text.encode(),
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=60,
    )
    if stat_run.returncode != 0:
        raise HttpError(422, "patch_parse_failed", stat_run.stderr.decode(errors="replace").strip())
    files = []
    for row in stat_run.stdout.decode(errors="replace").splitlines():
        parts = row.split("\t", 2)
        if len(parts) == 3:
            a, r, p = parts
            files.append(
                {
                    "path": p,
                    "kind": "update",
                    "added": int(a) if a.isdigit() else 0,
                    "removed": int(r) if r.isdigit() else 0,
                    "source_path": None,
                }
            )
    run = subprocess.run(
        ["git", "apply", "--recount", "--whitespace=nowarn", "-"],
        input=text.encode(),
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=60,
    )
    ok = run.returncode == 0
    paths = [f["path"] for f in files]
    return {
        "status": "applied" if ok else "failed",
        "parsed_diff_blocks": len(files),
        "patches": len(files),
        "files": files if ok else [],
        "summary": {
            "requested": len(files),
            "applied": len(files) if ok else 0,
            "failed": 0 if ok else len(files),
        },
        "applied": paths if ok else [],
        "failed": []
        if ok
        else [{"path": p, "error": run.stderr.decode(errors="replace").strip()} for p in paths],
        "touched": paths if ok else [],
    }
