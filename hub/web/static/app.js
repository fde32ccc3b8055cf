// The pages' own behaviour (CSP: no inline scripts, so everything lives here).
// - After an htmx swap: the swapped content's [data-announce] text is read out through the
//   aria-live region #live, and a target marked data-focus-after-swap gets keyboard focus
//   on its first heading, so screen-reader and keyboard users know what changed.
// - A failed htmx request is announced too.
// - Forms with data-confirm ask before they are sent.
(function () {
  "use strict";

  function announce(text) {
    var live = document.getElementById("live");
    if (!live || !text) return;
    live.textContent = "";
    window.setTimeout(function () { live.textContent = text; }, 50);
  }

  function focusHeading(region) {
    var heading = region.querySelector("h1, h2, h3, [data-focus]") || region;
    if (!heading.hasAttribute("tabindex")) heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: false });
  }

  document.addEventListener("htmx:afterSettle", function (event) {
    var target = event.detail && event.detail.target;
    if (!target) return;
    var marked = target.matches("[data-announce]") ? target : target.querySelector("[data-announce]");
    if (marked) announce(marked.getAttribute("data-announce"));
    if (target.hasAttribute("data-focus-after-swap")) focusHeading(target);
  });

  document.addEventListener("htmx:responseError", function () {
    var live = document.getElementById("live");
    announce(live ? live.getAttribute("data-error-text") : "Error");
  });
  document.addEventListener("htmx:sendError", function () {
    var live = document.getElementById("live");
    announce(live ? live.getAttribute("data-offline-text") : "Offline");
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form instanceof HTMLFormElement && form.hasAttribute("data-confirm")) {
      if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
    }
  }, true);

  // Toggle buttons: <button data-toggle="id"> shows/hides the element with that id and keeps
  // aria-expanded true to what is shown (the chart/table switch of the record pages uses it).
  document.addEventListener("click", function (event) {
    var button = event.target instanceof Element ? event.target.closest("[data-toggle]") : null;
    if (!button) return;
    var shown = document.getElementById(button.getAttribute("data-toggle"));
    if (!shown) return;
    shown.hidden = !shown.hidden;
    button.setAttribute("aria-expanded", String(!shown.hidden));
  });
})();
