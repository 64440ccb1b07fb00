// Live updates come over the websocket; while it is down, the jobs panel polls instead
// (its hx-trigger checks window.photoboothLive).
window.photoboothLive = false;
document.addEventListener("htmx:wsOpen", () => { window.photoboothLive = true; });
document.addEventListener("htmx:wsClose", () => { window.photoboothLive = false; });

// A job this page does not show yet (asked for in another tab, or started by a worker after the
// page was rendered) arrives as an update of an element the page lacks: the panel is fetched again.
document.addEventListener("htmx:oobErrorNoTarget", (event) => {
  const panel = document.getElementById("jobs");
  if (!panel || !/^job-\d+$/.test(event.detail.content.id) || panel.dataset.fetching) return;
  panel.dataset.fetching = "true";  // one fetch for a burst of updates (the new panel has no flag)
  htmx.ajax("GET", panel.getAttribute("hx-get"), { target: panel, swap: "outerHTML" }).finally(() => {
    delete panel.dataset.fetching;
  });
});

// A double's page follows its status. The status arrives over the socket (on every change, and on
// connect, which covers changes missed before it opened); when it differs from the status the
// page's body was rendered for, the body is fetched again (an htmx GET of the page answers with it).
// Checked again after each fetch, so fast changes (preparing, then ready) settle on the latest.
function followPersonaStatus() {
  for (const body of document.querySelectorAll("[id$='-body'][data-status]")) {
    const status = document.getElementById(body.id.replace(/-body$/, "-status"));
    if (!status || status.dataset.status === body.dataset.status || body.dataset.fetching) continue;
    body.dataset.fetching = "true";
    htmx.ajax("GET", body.dataset.url, { target: body, swap: "outerHTML" }).finally(() => {
      delete body.dataset.fetching;  // the old element, if the answer failed to replace it
      setTimeout(followPersonaStatus, 0);
    });
  }
}
document.addEventListener("htmx:wsAfterMessage", followPersonaStatus);

// The album groups portraits by double, each group with its download and delete. A portrait that
// arrives over the socket shows at once at the top (#album-live); then the album is fetched again,
// which puts it in its group, and the portraits shown at the top before the fetch leave it (one
// the album no longer lists was deleted meanwhile). Arrivals during a fetch get one more fetch.
function regroupAlbum() {
  const live = document.getElementById("album-live");
  if (!live || !live.children.length) return;
  if (live.dataset.fetching) {
    live.dataset.again = "true";
    return;
  }
  live.dataset.fetching = "true";
  const shown = Array.from(live.children);
  htmx.ajax("GET", live.dataset.url, { target: "#album", select: "#album", swap: "outerHTML" }).then(() => {
    for (const item of shown) item.remove();
  }).finally(() => {
    delete live.dataset.fetching;
    if (live.dataset.again) {
      delete live.dataset.again;
      regroupAlbum();
    }
  });
}
document.addEventListener("htmx:wsAfterMessage", regroupAlbum);

// A failed htmx request says so in the page's alert line (base.html). A refused form (400) comes
// back with its errors and is swapped in place as usual; an error page (a 400 Django refused
// itself, 403, 404, 500) lends its words instead of replacing the panel that asked, and a request
// that got no answer uses the line's own. The line goes when the person sends a form, or when the
// URL that failed (a poll) answers again.
let failedPath = null;

function requestErrorLine() {
  return document.getElementById("request-error");
}

function showRequestError(detail, heading, explanation) {
  const line = requestErrorLine();
  line.replaceChildren();
  if (heading) line.append(Object.assign(document.createElement("strong"), { textContent: heading }), " ");
  line.append(explanation);
  line.hidden = false;
  failedPath = detail.pathInfo.requestPath;
}

function hideRequestError() {
  requestErrorLine().hidden = true;
  failedPath = null;
}

document.addEventListener("htmx:beforeSwap", (event) => {
  const xhr = event.detail.xhr;
  if (xhr.status < 400 || !requestErrorLine()) return;
  const errorPage = new DOMParser().parseFromString(xhr.responseText, "text/html").querySelector("main[data-error-page]");
  if (xhr.status === 400 && !errorPage) return;
  event.detail.shouldSwap = false;
  event.detail.isError = true;
  if (errorPage) {
    showRequestError(event.detail, errorPage.querySelector("h1").textContent, errorPage.querySelector("p").textContent);
  } else {
    showRequestError(event.detail, "", requestErrorLine().dataset.failed);
  }
});
document.addEventListener("htmx:sendError", (event) => {
  if (requestErrorLine()) showRequestError(event.detail, "", requestErrorLine().dataset.unreachable);
});
document.addEventListener("htmx:beforeRequest", (event) => {
  if (requestErrorLine() && event.detail.elt.tagName === "FORM") hideRequestError();
});
document.addEventListener("htmx:afterRequest", (event) => {
  if (event.detail.successful && failedPath && event.detail.pathInfo.requestPath === failedPath) hideRequestError();
});
