// The e2b-desktop viewer: noVNC's RFB client on /websockify, with a fresh ticket per (re)connection.
import RFB from "/static/novnc/core/rfb.js";

const config = JSON.parse(document.getElementById("config").textContent);
const screen = document.getElementById("screen");
const overlay = document.getElementById("overlay");
const status = document.getElementById("status");
const state = (window.viewerState = { connected: false, connects: 0, lastError: null });
let rfb = null;
let fit = true;

function show(text, kind) {
  status.textContent = text;
  status.className = "pill" + (kind ? " " + kind : "");
}

async function freshTicket() {
  const response = await fetch(config.ticket_url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401 || response.status === 404) {
    location.reload(); // signed out or the desktop ended: the page explains
    throw new Error("not allowed");
  }
  if (!response.ok) throw new Error("ticket: HTTP " + response.status);
  return (await response.json()).ticket;
}

function connect(ticket) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = new URLSearchParams({ desktop: config.desktop_id, ticket });
  if (config.view_only) query.set("view_only", "1");
  overlay.hidden = false;
  overlay.textContent = "Connecting to the desktop…";
  show("connecting", "warn");
  rfb = new RFB(screen, `${scheme}://${location.host}/websockify?${query}`, { wsProtocols: ["binary"] });
  rfb.viewOnly = config.view_only;
  rfb.scaleViewport = fit;
  rfb.clipViewport = !fit;
  rfb.background = "#0b0f14";
  rfb.addEventListener("connect", () => {
    state.connected = true;
    state.connects += 1;
    overlay.hidden = true;
    show("connected", "ok");
  });
  rfb.addEventListener("disconnect", (event) => {
    state.connected = false;
    state.lastError = event.detail && event.detail.clean ? null : "connection lost";
    overlay.hidden = false;
    overlay.textContent = "Disconnected. Reconnecting…";
    show("reconnecting", "bad");
    rfb = null;
    setTimeout(() => freshTicket().then(connect).catch((err) => (state.lastError = String(err))), 2000);
  });
}

document.getElementById("scale").addEventListener("click", (event) => {
  fit = !fit;
  event.currentTarget.textContent = fit ? "Actual size" : "Fit to window";
  if (rfb) {
    rfb.scaleViewport = fit;
    rfb.clipViewport = !fit;
  }
});
document.getElementById("fullscreen").addEventListener("click", () => {
  if (document.fullscreenElement) document.exitFullscreen();
  else document.documentElement.requestFullscreen();
});

// Embedded (e2b-surf's live view): the page around it has the controls, so the screen gets all the room.
if (window.top !== window) document.body.classList.add("embedded");
connect(config.ticket);
