"""The dashboard's pages in a real browser (Playwright + Debian's Chromium), without VMs:
every main page loads with no JavaScript error, console error or failed request (and is
saved as a screenshot); a viewer finds every control disabled; the usage page shows a
day's exact figures on a fixed clock; a top-up is paid through Stripe.js (localstripe's
stand-in) and credited by the webhook while the page waits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from sandboxes.models import Host, SandboxState
from teams.models import Role, Team
from teams.services import membership_ensure
from templates_app.models import TemplateVersion
from tests.billing_support import a_metered_day, clock_install, stripe_client, stripe_point
from tests.browser_support import Watched, chromium, sign_in, watch
from tests.conftest import Actor
from tests.factories import SandboxFactory

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "a long enough passphrase 42"
SECONDS = 1000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def person(actor: Actor) -> Actor:
    actor.user.set_password(PASSWORD)
    actor.user.save()
    return actor


def signed_in(browser: Browser, base: str, actor: Actor) -> Watched:
    w = watch(browser.new_context(viewport={"width": 1280, "height": 900}))
    sign_in(w, base, person(actor).user.email, PASSWORD)
    w.assert_clean()
    return w


def test_every_main_page_loads_cleanly(
    browser: Browser, edge, owner: Actor, acme: Team, local_host: Host, base_version_row: TemplateVersion
) -> None:  # type: ignore[no-untyped-def]
    for n in range(3):
        SandboxFactory(
            team=acme,
            host=local_host,
            template_version=base_version_row,
            template=base_version_row.template,
            state=SandboxState.DESTROYED if n == 2 else SandboxState.STOPPED,
            metadata={"job": f"job-{n}"},
        )
    w = signed_in(browser, edge.url, owner)
    pages = {
        "sandboxes-list": "sandboxes",
        "templates": "templates",
        "volumes": "volumes",
        "checkpoints": "checkpoints",
        "keys": "keys",
        "usage": "usage",
        "statements": "statements",
        "ledger": "usage/ledger",
        "top-ups": "usage/top-ups",
        "team": "team",
        "audit": "audit",
    }
    for name, path in pages.items():
        response = w.goto(f"{edge.url}/dashboard/t/acme/{path}")
        assert response is not None and response.status == 200, (path, response and response.status)
        w.shot(name)
        w.assert_clean()
    w.goto(f"{edge.url}/dashboard/account")
    w.shot("account")
    w.assert_clean()
    # the list refreshes itself without a reload, stays clean while it does, and keeps the
    # keyboard's focus on the link it was on
    w.page.goto(f"{edge.url}/dashboard/t/acme/sandboxes")
    w.page.focus("#sandbox-rows tr a")
    focused = w.page.evaluate("document.activeElement.textContent.trim()")
    w.page.evaluate("document.querySelector('#sandbox-rows').dataset.before = 'refresh'")
    # the rows are replaced by a refresh (the marked element is gone) and focus is back in them
    w.page.wait_for_function(
        """() => !document.querySelector('#sandbox-rows').dataset.before
                 && document.activeElement.closest('#sandbox-rows') !== null""",
        timeout=10 * SECONDS,
    )
    assert w.page.evaluate("document.activeElement.textContent.trim()") == focused
    w.assert_clean()


def test_a_viewer_finds_every_control_disabled(
    browser: Browser,
    edge,
    owner: Actor,
    viewer: Actor,
    acme: Team,
    local_host: Host,
    fake_driver,
    base_version_row,
    settings,
) -> None:  # type: ignore[no-untyped-def]
    settings.STRIPE_SECRET_KEY, settings.STRIPE_PUBLISHABLE_KEY = "sk_test_viewer", "pk_test_viewer"
    sandbox = SandboxFactory(
        team=acme,
        host=local_host,
        template_version=base_version_row,
        template=base_version_row.template,
        state=SandboxState.STOPPED,
    )
    w = signed_in(browser, edge.url, viewer)
    w.goto(f"{edge.url}/dashboard/t/acme/sandboxes/{sandbox.pk}")
    w.shot("sandbox-detail-as-viewer")
    for action in ("pause", "resume", "kill", "timeout", "checkpoint"):
        assert w.page.is_disabled(f"button[data-action={action}]"), action
    assert w.page.locator("[data-terminal-open]").count() == 0  # no terminal for a viewer
    w.assert_clean()

    w.goto(f"{edge.url}/dashboard/t/acme/team")
    enabled = w.page.locator("main form[method=post] button[type=submit]:not([disabled])")
    # all a viewer may do here is leave the team, or make a team of their own
    assert [enabled.nth(i).text_content().strip() for i in range(enabled.count())] == [
        "Leave Acme",
        "Create team",
    ]
    w.goto(f"{edge.url}/dashboard/t/acme/usage")
    assert w.page.is_disabled("#top-up button[type=submit]")
    w.assert_clean()


def test_the_usage_page_shows_the_days_figures_on_a_fixed_clock(
    browser: Browser, edge, owner: Actor, acme: Team, monkeypatch, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.BILLING_RUNTIME_WINDOW_SECONDS = 600
    a_metered_day(acme, clock_install(monkeypatch))  # 2026-11-02, the clock left at 11-03 01:00

    w = signed_in(browser, edge.url, owner)
    w.goto(f"{edge.url}/dashboard/t/acme/usage")

    day = {
        cell.get_attribute("data-line-item"): cell.get_attribute("data-amount")
        for cell in w.page.query_selector_all("td[data-day='2026-11-02']")
    }
    assert day == {"vcpu": "0.162000", "memory": "0.016200", "volume": "0.003333", "total": "0.181533"}
    assert w.page.get_attribute("[data-balance]", "data-balance") == "0.818467"
    # the charts were drawn (Chart.js sized their canvases)
    for canvas in ("#usage-by-day", "#usage-by-item"):
        assert w.page.evaluate(f"document.querySelector('{canvas}').width") > 0
    w.shot("usage-fixed-clock")
    w.assert_clean()


def test_a_top_up_is_paid_with_stripe_js_and_credited_while_the_page_waits(
    browser: Browser, edge, owner: Actor, acme: Team, localstripe: str, settings
) -> None:  # type: ignore[no-untyped-def]
    stripe_point(settings, localstripe, edge.url)
    settings.STRIPE_JS_URL = f"{localstripe}/js.stripe.com/v3/"
    w = signed_in(browser, edge.url, owner)

    # the owner asks for 12.50 and gets Stripe's payment form
    w.goto(f"{edge.url}/dashboard/t/acme/usage")
    w.page.fill("#top-up input[name=amount]", "12.50")
    w.page.click("#top-up button[type=submit]")
    w.page.wait_for_selector("#payment-submit:not([disabled])", timeout=30 * SECONDS)
    w.shot("top-up-payment")
    secret = w.page.get_attribute("#top-up-pay", "data-client-secret")
    intent_id = secret.split("_secret_")[0]
    # (localstripe's Stripe.js only completes a card that asks for authentication: the card
    # the customer typed is attached as Stripe would, a 3-D Secure test card)
    client = stripe_client(localstripe)
    card = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": "4000002500003155", "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    client.v1.payment_intents.update(intent_id, params={"payment_method": card.id})
    assert client.v1.payment_intents.confirm(intent_id).status == "requires_action"

    # they pay, pass the card's authentication, and the page waits for the webhook's credit
    w.page.click("#payment-submit")
    w.page.click("text=Complete authentication")
    w.page.wait_for_selector("[data-new-balance]", timeout=60 * SECONDS)
    assert w.page.get_attribute("[data-new-balance]", "data-new-balance") == "12.500000"
    w.shot("top-up-paid")
    w.assert_clean()


def test_a_member_of_another_team_cannot_see_its_pages(
    browser: Browser, edge, owner: Actor, outsider: Actor, acme: Team, local_host: Host, base_version_row
) -> None:  # type: ignore[no-untyped-def]
    sandbox = SandboxFactory(
        team=acme, host=local_host, template_version=base_version_row, template=base_version_row.template
    )
    membership_ensure(
        user=outsider.user, team=Team.objects.create(slug="other", name="Other"), role=Role.OWNER
    )
    w = signed_in(browser, edge.url, outsider)
    for path in (f"t/acme/sandboxes/{sandbox.pk}", "t/acme/sandboxes", f"t/other/sandboxes/{sandbox.pk}"):
        w.expect_status(rf"/dashboard/{path}$", 404)
        response = w.goto(f"{edge.url}/dashboard/{path}")
        assert response is not None and response.status == 404, path
        assert "belongs to a team you are not in" in w.page.text_content("main")
    w.assert_clean()
