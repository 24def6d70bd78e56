// The dashboard's only script: live fragments, confirmations, copy buttons. No framework.
(function () {
  "use strict";

  // An element with data-live="URL" is re-fetched from URL every data-live-interval ms while
  // data-live-active is "true", and replaced by the fragment the server renders (the same
  // template the page was rendered with). A session that expired sends the browser to sign in.
  function schedule(el) {
    if (el.dataset.liveActive !== "true") return;
    setTimeout(function () {
      if (document.hidden) { schedule(el); return; }
      refresh(el);
    }, Number(el.dataset.liveInterval || 2000));
  }

  function refresh(el) {
    fetch(el.dataset.live, {
      credentials: "same-origin",
      headers: { "Accept": "text/html" },
      redirect: "follow",
    }).then(function (r) {
      if (r.redirected && new URL(r.url).pathname === "/login") { location.reload(); return null; }
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.text();
    }).then(function (html) {
      if (html === null) return;
      var tpl = document.createElement("template");
      tpl.innerHTML = html.trim();
      var fresh = tpl.content.firstElementChild;
      if (!fresh || !document.body.contains(el)) return;
      // Ticked boxes marked data-keep (the runs to compare) survive the refresh.
      el.querySelectorAll("input[data-keep]:checked").forEach(function (old) {
        fresh.querySelectorAll("input[data-keep]").forEach(function (box) {
          if (box.name === old.name && box.value === old.value) box.checked = true;
        });
      });
      fresh.dataset.liveRefreshes = String(Number(el.dataset.liveRefreshes || 0) + 1);
      el.replaceWith(fresh);
      schedule(fresh);
    }).catch(function () {
      // The server is restarting or the network blinked: try again later.
      el.dataset.liveErrors = String(Number(el.dataset.liveErrors || 0) + 1);
      schedule(el);
    });
  }

  document.querySelectorAll("[data-live]").forEach(schedule);

  document.addEventListener("submit", function (e) {
    var msg = e.target.dataset && e.target.dataset.confirm;
    if (msg && !window.confirm(msg)) e.preventDefault();
  });

  document.addEventListener("click", function (e) {
    var b = e.target.closest ? e.target.closest("[data-copy]") : null;
    if (!b) return;
    var src = document.getElementById(b.dataset.copy);
    if (src && navigator.clipboard) {
      navigator.clipboard.writeText(src.textContent.trim()).then(function () {
        b.textContent = "Copied";
      });
    }
  });
})();
