"""The dashboard in a real browser (Playwright + Debian's Chromium) against real VMs, the
real SDK and a real build worker: what a new user does on their first day.

Sign up; mint a write key and start a sandbox with it through the SDK; see it appear in
the list without a reload; open its terminal and run `echo hello`; pause and resume it
from the page; watch a template build's log lines arrive; and find that another user
gets a 404 for that sandbox's page. Every page load is checked for JavaScript errors,
console errors and failed requests, and the main pages are saved as screenshots.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest
from django.conf import settings as django_settings

from teams.models import AuditEvent, Team, User
from templates_app.builds import template_build_start
from templates_app.models import VersionStatus
from tests.browser_support import Watched, chromium, sign_in, watch
from tests.conftest import celery_worker, helper_process_env
from tests.sdk import run_scenario
from tests.waiting import wait_until

pytestmark = [pytest.mark.vm, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

EMAIL, PASSWORD = "first-day@dash.test", "a long enough passphrase 42"
SECONDS = 1000  # Playwright counts milliseconds


@pytest.fixture
def build_worker(require_postgres: None) -> Iterator[subprocess.Popen[bytes]]:
    assert django_settings.REDIS_URL, "builds need the Redis broker in tests"
    with celery_worker(helper_process_env()) as worker:
        yield worker


def terminal_has_line(w: Watched, text: str) -> None:
    """Wait until a row of the xterm.js screen reads exactly `text` (an output line, not
    the typed command echoed back)."""
    try:
        w.page.wait_for_function(
            """(text) => Array.from(document.querySelectorAll('#terminal .xterm-rows > div'))
                  .some((row) => row.textContent.trim() === text)""",
            arg=text,
            timeout=60 * SECONDS,
        )
    except Exception as exc:
        rows = w.page.eval_on_selector_all("#terminal .xterm-rows > div", "rs => rs.map(r => r.textContent)")
        status = w.page.text_content("#terminal-status") if w.page.query_selector("#terminal-status") else ""
        screen = [row for row in rows if row.strip()]
        raise AssertionError(f"no row reads {text!r}; the screen: {screen}, {status}") from exc


def state_is(w: Watched, state: str) -> None:
    w.page.wait_for_function(
        "(s) => document.querySelector('[data-sandbox-state]')?.textContent.trim() === s",
        arg=state,
        timeout=120 * SECONDS,
    )


def test_first_day_in_the_dashboard(edge, base_version, vm_cleanup, build_worker, settings) -> None:  # type: ignore[no-untyped-def]
    settings.SIGNUP_OPEN = True
    base = edge.url
    with chromium() as browser:
        w = watch(browser.new_context(viewport={"width": 1280, "height": 900}))
        page = w.page

        # a new user signs up and lands on their personal team's (empty) sandboxes
        w.goto(f"{base}/dashboard/sign-up")
        w.shot("sign-up")
        page.fill("#id_email", EMAIL)
        page.fill("#id_password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/dashboard/t/[^/]+/sandboxes$"))
        slug = Team.objects.get(personal_for__email=EMAIL).slug
        assert page.url == f"{base}/dashboard/t/{slug}/sandboxes"
        w.assert_clean()

        # mints a write key, shown once
        w.goto(f"{base}/dashboard/t/{slug}/keys")
        page.fill("#id_key_name", "my agent")
        page.select_option("#id_key_scope", "write")
        page.click("form[action$='/keys/new'] button[type=submit]")
        page.wait_for_selector("#new-key-secret")
        key = page.text_content("#new-key-secret").strip()
        assert key.startswith("wsk_")
        w.shot("api-keys-new-secret")
        w.assert_clean()

        # and, with the list open, starts a sandbox through the SDK with it
        w.goto(f"{base}/dashboard/t/{slug}/sandboxes")
        sandbox_id = run_scenario("dashboard", api_url=f"{base}/v1", api_key=key, args=("start",)).strip()
        row = page.wait_for_selector(f'tr[data-sandbox-id="{sandbox_id}"]', timeout=30 * SECONDS)
        assert "via" in row.text_content() and "sdk" in row.text_content()
        w.shot("sandboxes")
        w.assert_clean()

        # opens it, and its terminal runs a command
        row.click()
        page.wait_for_url(f"{base}/dashboard/t/{slug}/sandboxes/{sandbox_id}")
        page.wait_for_load_state("networkidle")
        page.click("[data-terminal-open]")
        page.wait_for_selector("#terminal .xterm-rows", timeout=30 * SECONDS)
        page.click("#terminal")
        page.keyboard.type("echo hel''lo\n")  # the echoed command differs from its output
        terminal_has_line(w, "hello")
        w.shot("sandbox-detail")
        w.assert_clean()

        # pauses and resumes it from the page
        page.click("button[data-action=pause]")
        state_is(w, "stopped")
        assert page.is_disabled("button[data-action=pause]")  # the buttons follow the state
        page.click("button[data-action=resume]")
        state_is(w, "ready")
        assert page.is_disabled("button[data-action=resume]") and page.is_enabled("button[data-action=pause]")
        w.assert_clean()
        actions = set(
            AuditEvent.objects.filter(team__slug=slug, target=sandbox_id).values_list("action", "source")
        )
        assert {
            ("sandbox.create", "api"),
            ("sandbox.pause", "dashboard"),
            ("sandbox.resume", "dashboard"),
        } <= actions

        # watches a template build's log lines arrive while the page is open
        user = User.objects.get(email=EMAIL)
        version = template_build_start(
            user=user,
            name="dash-build",
            build_spec={"setup": ["for i in 1 2 3 4 5 6 7 8; do echo dash-line-$i; sleep 1; done"]},
            cpu=1,
            memory_mb=512,
            tags=[],
            team_slug=slug,
        )
        w.goto(f"{base}/dashboard/t/{slug}/templates/{version.template_id}/versions/{version.pk}")
        page.wait_for_selector(".log-line >> text=dash-line-1", timeout=300 * SECONDS)
        seen_first = page.locator(".log-line").count()
        page.wait_for_selector(".log-line >> text=dash-line-8", timeout=120 * SECONDS)
        assert page.locator(".log-line").count() > seen_first  # arrived without a reload
        wait_until(
            lambda: version.__class__.objects.get(pk=version.pk).status == VersionStatus.READY,
            300,
            "the build to finish",
        )
        w.shot("template-build")
        w.assert_clean()

        # another user is told the sandbox's page does not exist
        User.objects.create_user(email="someone-else@dash.test", password=PASSWORD)
        other = watch(browser.new_context())
        sign_in(other, base, "someone-else@dash.test", PASSWORD)
        other.expect_status(rf"/sandboxes/{sandbox_id}$", 404)
        response = other.goto(f"{base}/dashboard/t/{slug}/sandboxes/{sandbox_id}")
        assert response is not None and response.status == 404
        other.assert_clean()
