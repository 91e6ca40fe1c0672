// Paying a top-up with Stripe.js: the Payment Element where Stripe.js offers it
// (`elements({clientSecret}).create("payment")` + `confirmPayment`), else the Card Element
// (`elements().create("card")` + `confirmCardPayment`), which is all localstripe's stand-in
// implements. After Stripe confirms, the page asks our server for the top-up's status fragment
// until the webhook has credited it (the fragment says when and where to ask again).
(function () {
  "use strict";
  var root = document.getElementById("top-up-pay");
  if (!root) return;
  var form = document.getElementById("payment-form");
  var button = document.getElementById("payment-submit");
  var problem = document.getElementById("payment-error");
  var secret = root.getAttribute("data-client-secret");
  var key = root.getAttribute("data-publishable-key");

  function fail(message) {
    problem.textContent = message;
    button.disabled = false;
  }

  if (typeof window.Stripe !== "function") {
    problem.textContent = "Stripe's payment form could not be loaded; reload the page to try again.";
    return;
  }
  var stripe = window.Stripe(key);
  var paymentElement = typeof stripe.confirmPayment === "function";
  var elements = paymentElement ? stripe.elements({ clientSecret: secret }) : stripe.elements();
  var element = elements.create(paymentElement ? "payment" : "card");
  element.mount("#payment-element");
  button.disabled = false;

  // Polled with fetch, not htmx: localstripe's Stripe.js stand-in declares a global
  // `class Element`, which breaks htmx's `instanceof Element` on any swap in this page.
  function poll(url) {
    fetch(url, { credentials: "same-origin", headers: { "HX-Request": "true" } })
      .then(function (response) {
        if (!response.ok) throw new Error(String(response.status));
        return response.text();
      })
      .then(function (html) {
        var holder = document.createElement("template");
        holder.innerHTML = html.trim();
        var fresh = holder.content.firstElementChild;
        document.getElementById("top-up-status").replaceWith(fresh);
        var again = fresh.querySelector("[data-poll]");
        if (again) window.setTimeout(poll, 1000 * Number(again.getAttribute("data-delay")), again.getAttribute("hx-get"));
      })
      .catch(function () {
        window.setTimeout(poll, 5000, url);
      });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    button.disabled = true;
    problem.textContent = "";
    var confirming = paymentElement
      ? stripe.confirmPayment({
          elements: elements,
          redirect: "if_required",
          confirmParams: { return_url: root.getAttribute("data-return-url") },
        })
      : stripe.confirmCardPayment(secret, { payment_method: { card: element } });
    Promise.resolve(confirming).then(
      function (result) {
        if (result && result.error) {
          fail(result.error.message || "The payment did not go through; check the card and try again.");
          return;
        }
        form.hidden = true;
        poll(root.getAttribute("data-status-url"));
      },
      function () {
        fail("Stripe could not be reached; try again.");
      }
    );
  });
})();
