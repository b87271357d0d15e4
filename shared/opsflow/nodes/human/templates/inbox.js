// The inbox's only script, served by the service itself (its CSP allows no other).
// Every few seconds (the body's data-refresh-s) it fetches the page it is on again
// and swaps in the parts marked data-live: the queue, a task's state and holder, its
// facts and history, the actions still open. A part the person is working in (a
// focused control, text typed) is left alone until they are done. The pages work
// without it; it only saves a reload. Its requests carry X-Inbox-Refresh so they do
// not keep an unattended session alive, and it stops once the session is over.
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh-s"));
  if (!(seconds > 0) || !window.fetch || !window.DOMParser) {
    return;
  }

  function busy(part) {
    var focused = document.activeElement;
    if (focused && focused !== document.body && part.contains(focused)) {
      return true;
    }
    var fields = part.querySelectorAll("textarea, input:not([type=hidden])");
    for (var i = 0; i < fields.length; i += 1) {
      if (fields[i].value !== fields[i].defaultValue) {
        return true;
      }
    }
    return false;
  }

  function swap(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    var parts = document.querySelectorAll("[data-live]");
    for (var i = 0; i < parts.length; i += 1) {
      var part = parts[i];
      var now = fresh.getElementById(part.id);
      if (!now) {
        // Gone from the page (the task was decided: nothing left to act on).
        if (!busy(part)) {
          part.remove();
        }
      } else if (!busy(part) && now.innerHTML !== part.innerHTML) {
        part.replaceWith(document.importNode(now, true));
      }
    }
    document.body.setAttribute("data-refreshed-at", new Date().toISOString());
  }

  function refresh() {
    if (document.hidden) {
      later();
      return;
    }
    fetch(window.location.href, {
      credentials: "same-origin",
      cache: "no-store",
      redirect: "error",
      headers: { "X-Inbox-Refresh": "1" },
    })
      .then(function (answer) {
        if (answer.status === 401) {
          throw new Error("signed out");
        }
        if (answer.ok) {
          return answer.text().then(swap).then(later);
        }
        later();
      })
      .catch(function (error) {
        if (error.message !== "signed out") {
          later();
        }
      });
  }

  function later() {
    window.setTimeout(refresh, seconds * 1000);
  }

  later();
})();
