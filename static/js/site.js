// Live updates come over the websocket; while it is down, the jobs panel polls instead
// (its hx-trigger checks window.photoboothLive).
window.photoboothLive = false;
document.addEventListener("htmx:wsOpen", () => { window.photoboothLive = true; });
document.addEventListener("htmx:wsClose", () => { window.photoboothLive = false; });
