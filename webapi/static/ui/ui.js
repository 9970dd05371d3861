// AIOS dashboard: the overview's refresh and confirmations. Loaded as a file: the page's CSP allows no inline script.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Forms with data-confirm ask first (cancel, purge, revoke, disable).
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });

  // An element with data-refresh is replaced by the server-rendered fragment at that URL every few seconds.
  const box = document.querySelector("[data-refresh]");
  if (!box) return;
  const every = 1000 * Number(box.dataset.intervalS || 5);
  const refresh = async () => {
    try {
      const answer = await fetch(box.dataset.refresh, { credentials: "same-origin", cache: "no-store" });
      if (answer.status === 401) { window.location.reload(); return; }  // signed out: the page redirects
      if (answer.ok) box.innerHTML = await answer.text();
      box.classList.toggle("stale", !answer.ok);
    } catch (error) {
      box.classList.add("stale");
    }
    window.setTimeout(refresh, every);
  };
  window.setTimeout(refresh, every);
});
