"""Browser tests: Playwright driving Debian's Chromium against the real app.

The app is the `edge` fixture's uvicorn (edge + Django, in this process, on the test
database). Every page a test opens is watched: a JavaScript error, a console error, a
failed request or an answer >= 400 that the test did not expect fails the test when the
page is checked. Screenshots of the main pages go to `.artifacts/screenshots/`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, Request, Response, sync_playwright

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / ".artifacts" / "screenshots"


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium under Playwright (no browser download; root needs --no-sandbox).

    Playwright's sync API runs an event loop on this thread, so Django, which the test
    itself still uses between browser steps, is told that its synchronous calls here are
    intended (they are: the loop is idle while the test's own code runs)."""
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                yield browser
            finally:
                browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@dataclass
class Watched:
    """A page and everything that went wrong on it since the last `assert_clean`."""

    page: Page
    problems: list[str] = field(default_factory=list)
    expected_statuses: set[tuple[str, int]] = field(default_factory=set)

    def expect_status(self, path_pattern: str, status: int) -> None:
        """An answer the test provokes on purpose (a 404 it checks, say)."""
        self.expected_statuses.add((path_pattern, status))

    def _expected(self, url: str, status: int) -> bool:
        return any(status == s and re.search(p, url) for p, s in self.expected_statuses)

    def assert_clean(self) -> None:
        problems, self.problems = self.problems, []
        assert not problems, "the page logged problems:\n" + "\n".join(problems)

    def goto(self, url: str, **kwargs: Any) -> Response | None:
        response = self.page.goto(url, **kwargs)
        self.page.wait_for_load_state("networkidle")
        return response

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def watch(context: BrowserContext) -> Watched:
    page = context.new_page()
    watched = Watched(page)

    def on_console(message: Any) -> None:
        if message.type == "error" and not watched._expected(message.location.get("url", ""), 0):
            text = message.text
            # Chromium logs the resource errors the response hook below judges itself
            if not text.startswith("Failed to load resource"):
                watched.problems.append(f"console error: {text} ({message.location})")

    def on_page_error(error: Any) -> None:
        watched.problems.append(f"JavaScript error: {error}")

    def on_failed(request: Request) -> None:
        failure = request.failure or ""
        if "ERR_ABORTED" in failure and request.resource_type in ("document", "fetch", "xhr"):
            return  # a navigation or poll cut short by the next one
        watched.problems.append(f"request failed: {request.method} {request.url}: {failure}")

    def on_response(response: Response) -> None:
        if response.status >= 400 and not watched._expected(response.url, response.status):
            watched.problems.append(f"answer {response.status}: {response.request.method} {response.url}")

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    page.on("requestfailed", on_failed)
    page.on("response", on_response)
    return watched


def sign_in(watched: Watched, base: str, email: str, password: str) -> None:
    watched.goto(f"{base}/dashboard/sign-in")
    watched.page.fill("input[name=username]", email)
    watched.page.fill("input[name=password]", password)
    watched.page.click("button[type=submit]")
    watched.page.wait_for_load_state("networkidle")
