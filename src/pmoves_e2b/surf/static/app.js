// e2b-surf's web UI: plain DOM, no framework, no build step. Data comes from the JSON API on this
// origin (login cookie); a session's steps arrive over SSE; its live desktop is e2b-desktop's viewer.
import { renderMarkdown } from "/static/markdown.js";

const config = JSON.parse(document.getElementById("config").textContent);
const root = document.getElementById("app");
const FINAL = ["completed", "failed", "stopped", "interrupted"];
const FORMATS = ["markdown", "text", "html", "links", "tables", "screenshot"];
const DEFAULT_FORMATS = ["markdown", "text", "links", "tables", "screenshot"];
// Test hooks and a place to look when something goes wrong.
const ui = (window.surfUI = { events: 0, selected: null, lastError: null });

// ---------- helpers ----------
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store", ...options });
  const body = await response.json().catch(() => null);
  if (response.status === 401) {
    showSignIn("Your sign-in has expired. Sign in again.");
    throw new ApiError(401, "unauthorized", "signed out");
  }
  if (!response.ok) throw new ApiError(response.status, body && body.error, body && body.detail);
  return body;
}

function toast(text) {
  ui.lastError = text;
  const node = h("div", { class: "toast", role: "alert", text });
  document.body.append(node);
  setTimeout(() => node.remove(), 5000);
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const seconds = Math.round((Date.now() - date.getTime()) / 1000);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return date.toLocaleString();
}

function duration(session) {
  if (!session.started_at) return "";
  const end = session.ended_at ? new Date(session.ended_at) : new Date();
  const seconds = Math.max(0, Math.round((end - new Date(session.started_at)) / 1000));
  return seconds < 60 ? `${seconds} s` : `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
}

function hostOf(url) {
  try {
    const parsed = new URL(url);
    return parsed.host + (parsed.pathname === "/" ? "" : parsed.pathname);
  } catch {
    return url;
  }
}

// A FileRef's URL on this origin (the cookie opens it, whatever NEXT_PUBLIC_API_URL says).
function fileUrl(sessionId, ref) {
  return `/api/sessions/${encodeURIComponent(sessionId)}/files/${encodeURIComponent(ref.file)}`;
}

const isRef = (value) => value && typeof value === "object" && typeof value.file === "string";

async function textOf(sessionId, value) {
  if (!isRef(value)) return value || "";
  const response = await fetch(fileUrl(sessionId, value), { credentials: "same-origin" });
  if (!response.ok) throw new Error(`could not load ${value.file}: HTTP ${response.status}`);
  return response.text();
}

function download(name, text, type = "text/plain") {
  const url = URL.createObjectURL(new Blob([text], { type: `${type};charset=utf-8` }));
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function csv(table) {
  const cell = (value) => (/[",\n]/.test(value) ? `"${value.replaceAll('"', '""')}"` : value);
  const rows = table.headers && table.headers.length ? [table.headers, ...table.rows] : table.rows;
  return rows.map((row) => row.map((v) => cell(String(v ?? ""))).join(",")).join("\n") + "\n";
}

function lightbox(src) {
  const box = h("div", { class: "lightbox", onclick: () => box.remove() }, h("img", { src, alt: "Screenshot" }));
  document.body.append(box);
}

function pill(state) {
  return h("span", { class: `pill ${state}`, "data-state": state, text: state });
}

// ---------- sign-in ----------
function bar(signedIn) {
  return h(
    "header",
    { class: "bar" },
    h("a", { class: "brand", href: "/" }, "e2b-surf"),
    h("span", { class: "tag" }, "web runs in isolated desktops"),
    h("span", { class: "spacer" }),
    signedIn && config.desktop_url
      ? h("a", { class: "btn small", href: config.desktop_url, target: "_blank", rel: "noopener" }, "Desktops")
      : null,
    signedIn
      ? h("form", { method: "post", action: "/logout" }, h("button", { class: "btn small", type: "submit" }, "Sign out"))
      : null,
  );
}

function showSignIn(notice = "") {
  closeStream();
  clearInterval(listTimer);
  const error = h("p", { class: "error-text", role: "alert", text: notice, hidden: !notice });
  const token = h("input", {
    type: "password",
    name: "token",
    placeholder: "Access token",
    autocomplete: "current-password",
    required: true,
    autofocus: true,
  });
  const submit = h("button", { class: "btn primary wide", type: "submit" }, "Sign in");
  const form = h(
    "form",
    { class: "card signin", id: "signin", onsubmit: (event) => signIn(event, token, error, submit) },
    h("h1", {}, "Sign in to e2b-surf"),
    h(
      "p",
      {},
      "Paste the surf access token (",
      h("code", {}, "E2B_SURF_AUTH_TOKEN"),
      "; by default in ",
      h("code", {}, "$E2B_DATA_DIR/secrets/"),
      ").",
    ),
    token,
    error,
    submit,
  );
  root.replaceChildren(bar(false), h("main", { class: "center" }, form));
  token.focus();
}

async function signIn(event, token, error, submit) {
  event.preventDefault();
  submit.disabled = true;
  try {
    const body = new URLSearchParams({ token: token.value, next: "/" });
    const response = await fetch("/login", { method: "POST", body, credentials: "same-origin", redirect: "manual" });
    if (response.status === 401) {
      error.textContent = "That token is not right.";
      error.hidden = false;
      token.select();
      return;
    }
    showApp();
  } catch (err) {
    error.textContent = String(err);
    error.hidden = false;
  } finally {
    submit.disabled = false;
  }
}

// ---------- the app ----------
let listTimer = null;
let sessions = [];
let stream = null;
let current = null; // {session, steps: Map, pages: Map, result, error, pageIndex, tab}
let listNode = null;
let mainNode = null;

function showApp() {
  listNode = h("ul", { id: "sessions" });
  mainNode = h("section", { class: "main", id: "main" });
  const side = h(
    "aside",
    { class: "side" },
    h("div", { class: "card" }, h("h2", {}, "New run"), newRunForm()),
    h(
      "div",
      { class: "card sessions" },
      h("div", { class: "card-head" }, "Sessions", h("span", { class: "spacer" }), h("span", { id: "running-count" })),
      listNode,
    ),
  );
  root.replaceChildren(bar(true), h("div", { class: "layout" }, side, mainNode));
  refreshList();
  clearInterval(listTimer);
  listTimer = setInterval(refreshList, 4000);
  route();
}

function newRunForm() {
  let mode = "scrape";
  const url = h("input", { type: "url", name: "url", placeholder: "https://example.com/", required: true });
  const task = h("textarea", { name: "task", rows: 3, placeholder: "What should the agent do on this site?" });
  const follow = h("input", { type: "checkbox", name: "follow_links" });
  const depth = h("input", { type: "number", name: "depth", min: 0, max: 10, value: 1 });
  const maxPages = h("input", { type: "number", name: "max_pages", min: 1, max: 500, value: 10 });
  const sameOrigin = h("input", { type: "checkbox", name: "same_origin", checked: true });
  const extract = h("input", { type: "checkbox", name: "extract_content", checked: true });
  const formats = FORMATS.map((name) =>
    h("input", { type: "checkbox", name: "format", value: name, checked: DEFAULT_FORMATS.includes(name) }),
  );
  const model = h("input", { type: "text", name: "model", placeholder: "server default" });
  const maxSteps = h("input", { type: "number", name: "max_steps", min: 1, max: 500, placeholder: "default" });
  const timeout = h("input", { type: "number", name: "timeout", min: 1, placeholder: "server maximum" });
  const error = h("p", { class: "error-text", role: "alert", hidden: true });
  const submit = h("button", { class: "btn primary wide", type: "submit", id: "start" }, "Start scrape");

  const crawl = h(
    "div",
    { class: "row2" },
    h("label", { class: "field" }, "Link depth", depth),
    h("label", { class: "field" }, "Max pages", maxPages),
  );
  const scrapeBox = h(
    "div",
    { class: "scrape-only stack" },
    h("label", { class: "check" }, follow, "Follow links (crawl)"),
    crawl,
  );
  const scrapeMore = h(
    "div",
    { class: "scrape-only stack" },
    h("label", { class: "check" }, sameOrigin, "Stay on the same site"),
    h("label", { class: "check" }, extract, "Extract the main content"),
    h(
      "div",
      { class: "field" },
      h("span", {}, "Formats"),
      h(
        "div",
        { class: "chips" },
        formats.map((box) => h("label", { class: "check" }, box, box.value)),
      ),
    ),
  );
  const agentBox = h(
    "div",
    { class: "agent-only stack", hidden: true },
    h("label", { class: "field" }, "Task", task),
  );
  const agentMore = h(
    "div",
    { class: "agent-only row2", hidden: true },
    h("label", { class: "field" }, "Model", model),
    h("label", { class: "field" }, "Max steps", maxSteps),
  );
  const syncCrawl = () => {
    depth.disabled = maxPages.disabled = !follow.checked;
    crawl.classList.toggle("off", !follow.checked);
  };
  follow.addEventListener("change", syncCrawl);
  syncCrawl();

  const buttons = ["scrape", "agent"].map((name) =>
    h(
      "button",
      {
        type: "button",
        "data-mode": name,
        "aria-pressed": String(name === mode),
        onclick: () => {
          mode = name;
          for (const b of buttons) b.setAttribute("aria-pressed", String(b.dataset.mode === mode));
          for (const node of form.querySelectorAll(".scrape-only")) node.hidden = mode !== "scrape";
          for (const node of form.querySelectorAll(".agent-only")) node.hidden = mode !== "agent";
          task.required = mode === "agent";
          submit.textContent = mode === "agent" ? "Start agent" : "Start scrape";
        },
      },
      name === "scrape" ? "Scrape" : "Agent",
    ),
  );

  async function start(event) {
    event.preventDefault();
    error.hidden = true;
    const body = { url: url.value.trim(), mode };
    if (timeout.value) body.timeout = Number(timeout.value);
    if (mode === "scrape") {
      body.follow_links = follow.checked;
      if (follow.checked) {
        body.depth = Number(depth.value);
        body.max_pages = Number(maxPages.value);
      }
      body.same_origin = sameOrigin.checked;
      body.extract_content = extract.checked;
      body.formats = formats.filter((b) => b.checked).map((b) => b.value);
    } else {
      body.task = task.value.trim();
      if (model.value.trim()) body.model = model.value.trim();
      if (maxSteps.value) body.max_steps = Number(maxSteps.value);
    }
    submit.disabled = true;
    try {
      const session = await api("/api/surf", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      sessions = [session, ...sessions.filter((s) => s.session_id !== session.session_id)];
      renderList();
      location.hash = `#/s/${session.session_id}`;
    } catch (err) {
      if (err.status === 401) return;
      error.textContent = err.status === 429 ? `Too many runs at once: ${err.message}` : err.message;
      error.hidden = false;
    } finally {
      submit.disabled = false;
    }
  }

  const form = h(
    "form",
    { class: "new-run", id: "new-run", onsubmit: start, novalidate: false },
    h("div", { class: "segmented", role: "group", "aria-label": "Mode" }, buttons),
    h("label", { class: "field" }, "Start URL", url),
    agentBox,
    scrapeBox,
    h(
      "details",
      { class: "more" },
      h("summary", {}, "More options"),
      h(
        "div",
        { class: "stack" },
        scrapeMore,
        agentMore,
        h("label", { class: "field" }, "Time limit (seconds)", timeout),
      ),
    ),
    error,
    submit,
  );
  return form;
}

async function refreshList() {
  try {
    const body = await api("/api/sessions?limit=100");
    sessions = body.sessions;
    // A run can pause for a person on its own (a safety check): no event says so, the list does.
    const listed = current && sessions.find((x) => x.session_id === current.session.session_id);
    if (listed && !FINAL.includes(current.session.state) && listed.taken_over !== current.session.taken_over) {
      current.session.taken_over = listed.taken_over;
      renderHead();
      if (liveKey(current.session) !== current.liveKey) renderLive();
    }
    document.getElementById("running-count").replaceChildren(
      body.running ? h("span", { class: "pill running" }, `${body.running} running`) : "",
    );
    renderList();
  } catch (err) {
    if (err.status !== 401) ui.lastError = String(err);
  }
}

function renderList() {
  if (!listNode) return;
  if (!sessions.length) {
    listNode.replaceChildren(h("li", { class: "empty-list" }, "No runs yet. Start one above."));
    return;
  }
  listNode.replaceChildren(
    ...sessions.map((s) =>
      h(
        "li",
        {},
        h(
          "button",
          {
            type: "button",
            "data-session": s.session_id,
            "aria-current": String(s.session_id === ui.selected),
            onclick: () => (location.hash = `#/s/${s.session_id}`),
          },
          h("span", { class: "s-url", title: s.request.url }, hostOf(s.request.url)),
          pill(s.state),
          h("span", { class: "s-meta" }, `${s.mode} · ${when(s.created_at)}`),
        ),
      ),
    ),
  );
}

// ---------- one session ----------
function route() {
  const match = /^#\/s\/([\w-]+)$/.exec(location.hash);
  const id = match ? match[1] : null;
  if (id === ui.selected && current) return;
  ui.selected = id;
  renderList();
  closeStream();
  current = null;
  if (!id) return renderHome();
  openSession(id);
}

function renderHome() {
  const feature = (title, text) => h("div", {}, h("b", {}, title), text);
  mainNode.replaceChildren(
    h(
      "div",
      { class: "card hero" },
      h("h1", {}, "Browse the web in a desktop you can watch"),
      h(
        "p",
        {},
        "Each run gets its own sandboxed desktop with Chromium. Scrape pages into clean Markdown, links and tables, " +
          "or let a computer-use agent work through a task while you follow every step live.",
      ),
      h(
        "div",
        { class: "features" },
        feature("Scrape", "Readable Markdown and text, links, tables and full-page screenshots, with robots.txt obeyed."),
        feature("Agent", "A vision model clicks, types and scrolls until the task is done; take over at any time."),
        feature("Live", "Watch the desktop as it works, follow the steps, download what it found."),
      ),
    ),
  );
}

function closeStream() {
  if (stream) stream.close();
  stream = null;
}

async function openSession(id) {
  let session;
  try {
    session = await api(`/api/sessions/${encodeURIComponent(id)}`);
  } catch (err) {
    if (err.status === 401) return;
    mainNode.replaceChildren(h("div", { class: "card hero" }, h("h1", {}, "Session not found"), h("p", {}, err.message)));
    return;
  }
  if (ui.selected !== id) return;
  current = {
    session,
    steps: new Map((session.steps || []).map((s) => [s.index, s])),
    pages: new Map((session.pages || []).map((p) => [p.index, p])),
    pageIndex: null,
    tab: null,
    viewer: null,
    viewOnly: true,
  };
  delete current.session.steps;
  delete current.session.pages;
  renderSession();
  if (!FINAL.includes(session.state)) listen(id);
}

function listen(id) {
  closeStream();
  stream = new EventSource(`/api/sessions/${encodeURIComponent(id)}/events`);
  stream.onmessage = (message) => {
    if (!current || current.session.session_id !== id) return;
    ui.events += 1;
    const event = JSON.parse(message.data);
    apply(event);
  };
  stream.onerror = () => {
    // The stream ends after the final state; EventSource would reconnect and replay: stop it.
    if (current && FINAL.includes(current.session.state)) closeStream();
  };
}

function apply(event) {
  const session = current.session;
  if (event.type === "state") {
    // A replayed first event carries the session as it was created (nulls included): keep what we know.
    for (const [key, value] of Object.entries(event.session || {})) {
      if (value !== null && key !== "steps" && key !== "pages") session[key] = value;
    }
    session.state = event.state;
    for (const key of ["desktop_id", "started_at", "ended_at", "taken_over"]) {
      if (event[key] !== undefined && event[key] !== null) session[key] = event[key];
    }
    renderHead();
    // The live view is rebuilt only when what it shows changes (a new frame would reconnect).
    if (liveKey(session) !== current.liveKey) renderLive();
    if (FINAL.includes(event.state)) {
      closeStream();
      current.viewer = null;
      refreshList();
      renderSteps();
      renderResults();
    }
    const listed = sessions.find((s) => s.session_id === session.session_id);
    if (listed) {
      listed.state = session.state;
      renderList();
    }
  } else if (event.type === "step") {
    if (!current.steps.has(event.step.index)) {
      current.steps.set(event.step.index, event.step);
      renderSteps();
    }
  } else if (event.type === "page") {
    if (!current.pages.has(event.page.index)) {
      current.pages.set(event.page.index, event.page);
      renderSteps();
      renderResults();
    }
  } else if (event.type === "result") {
    session.result = event.result;
    renderResults();
  } else if (event.type === "error") {
    session.error = event.error;
    renderHead();
  }
}

// The parts of the session view, each re-rendered on its own.
const parts = {};

function renderSession() {
  parts.head = h("div", { class: "card", id: "session-head" });
  parts.live = h("div", { class: "card live", id: "live" });
  parts.steps = h("div", { class: "card steps", id: "steps" });
  parts.results = h("div", { class: "card results", id: "results" });
  mainNode.replaceChildren(parts.head, h("div", { class: "split" }, parts.live, parts.steps), parts.results);
  renderHead();
  renderLive();
  renderSteps();
  renderResults();
}

function renderHead() {
  const s = current.session;
  const live = !FINAL.includes(s.state);
  const stop = h(
    "button",
    {
      class: "btn danger",
      id: "stop",
      type: "button",
      onclick: async () => {
        stop.disabled = true;
        try {
          const stopped = await api(`/api/sessions/${s.session_id}`, { method: "DELETE" });
          if (!FINAL.includes(current.session.state)) apply({ type: "state", state: stopped.state, ended_at: stopped.ended_at });
        } catch (err) {
          if (err.status !== 401) toast(`Could not stop: ${err.message}`);
          stop.disabled = false;
        }
      },
    },
    "Stop run",
  );
  const exportJson = h(
    "button",
    {
      class: "btn",
      type: "button",
      onclick: () => {
        const full = { ...current.session, steps: [...current.steps.values()], pages: [...current.pages.values()] };
        download(`${s.session_id}.json`, JSON.stringify(full, null, 2), "application/json");
      },
    },
    "JSON",
  );
  const sub = h(
    "div",
    { class: "sub" },
    pill(s.state),
    h("span", { class: "pill" }, s.mode),
    s.taken_over ? h("span", { class: "pill warn" }, "you have the desktop") : null,
    h("span", { class: "mono" }, s.session_id),
    h("span", {}, `started ${when(s.created_at)}`),
    s.started_at ? h("span", {}, `· ${duration(s)}`) : null,
  );
  const children = [
    h(
      "div",
      { class: "session-head" },
      h(
        "div",
        { class: "title" },
        h("a", { href: s.request.url, target: "_blank", rel: "noopener noreferrer" }, s.request.url),
        sub,
      ),
      exportJson,
      live ? stop : null,
    ),
  ];
  if (s.request.task) children.push(h("div", { class: "banner task" }, h("b", {}, "Task: "), s.request.task));
  if (s.error) {
    // A stop somebody asked for is not a failure.
    const kind = s.error.code === "stopped" ? "banner note" : "banner bad";
    children.push(h("div", { class: kind, id: "session-error" }, h("b", {}, `${s.error.code}: `), s.error.message));
  }
  parts.head.replaceChildren(...children);
}

function lastScreenshot() {
  const shots = [
    ...[...current.steps.values()].map((s) => [s.ts, s.data && s.data.screenshot]),
    ...[...current.pages.values()].map((p) => [p.ts, p.data && p.data.screenshot]),
  ].filter(([, ref]) => isRef(ref));
  shots.sort((a, b) => (a[0] < b[0] ? -1 : 1));
  return shots.length ? shots[shots.length - 1][1] : null;
}

function liveKey(session) {
  if (FINAL.includes(session.state)) return "ended";
  return session.desktop_id ? `${session.desktop_id}:${session.taken_over ? "person" : "agent"}` : "preparing";
}

async function renderLive() {
  const s = current.session;
  current.liveKey = liveKey(s);
  const screen = h("div", { class: "screen" });
  const tools = h("span", { class: "spacer" });
  const head = h("div", { class: "card-head" }, "Live desktop", tools);
  parts.live.replaceChildren(head, screen);
  const placeholder = (text, spinning, image) =>
    h(
      "div",
      { class: "placeholder" },
      image ? h("img", { src: fileUrl(s.session_id, image), alt: "" }) : null,
      spinning ? h("div", { class: "spinner" }) : null,
      h("span", {}, text),
    );
  if (FINAL.includes(s.state)) {
    const shot = lastScreenshot();
    screen.append(placeholder(`The desktop is gone: the run is ${s.state}.`, false, shot));
    return;
  }
  if (!s.desktop_id) {
    screen.append(placeholder("Preparing a desktop and Chromium…", true));
    return;
  }
  screen.append(placeholder("Connecting to the desktop…", true));
  try {
    current.viewer = current.viewer || (await api(`/api/sessions/${s.session_id}/viewer`));
  } catch (err) {
    if (err.status === 401 || !current || current.session !== s) return;
    screen.replaceChildren(placeholder(`No live view: ${err.message}`, false));
    return;
  }
  if (!current || current.session !== s || FINAL.includes(s.state)) return;
  const viewer = current.viewer;
  if (s.mode === "agent") current.viewOnly = !s.taken_over;
  const src = current.viewOnly ? viewer.view_only_url : viewer.viewer_url;
  const frame = h("iframe", { id: "desktop-frame", src, title: "Live desktop", allow: "fullscreen; clipboard-read; clipboard-write" });
  screen.replaceChildren(frame);
  // Agent runs: a person takes the desktop over (the agent waits) and hands it back; the model may
  // also pause for a person (a safety check). Scrape runs: just view or control.
  const agent = s.mode === "agent";
  const toggle = h(
    "button",
    {
      class: "btn small",
      type: "button",
      id: "control",
      onclick: async () => {
        try {
          if (agent) {
            const takeOver = !current.session.taken_over;
            await api(`/api/sessions/${s.session_id}/${takeOver ? "takeover" : "handback"}`, { method: "POST" });
            current.session.taken_over = takeOver;
          } else {
            current.viewOnly = !current.viewOnly;
          }
          renderHead();
          renderLive();
        } catch (err) {
          if (err.status !== 401) toast(err.message);
        }
      },
    },
    agent ? (s.taken_over ? "Hand back" : "Take over") : current.viewOnly ? "Take control" : "View only",
  );
  const open = h("a", { class: "btn small", href: viewer.view_only_url, target: "_blank", rel: "noopener" }, "Open");
  head.append(h("span", { class: current.viewOnly ? "pill" : "pill warn" }, current.viewOnly ? "watching" : "you control"), toggle, open);
}

function stepView(kind, title, detail, shot, sessionId) {
  return h(
    "li",
    { class: `step ${kind}`, "data-kind": kind },
    h("span", { class: "dot" }, kind === "page" ? "✓" : kind === "skip" ? "–" : kind === "visit" ? "→" : "•"),
    h(
      "div",
      {},
      h("div", { class: "what" }, title),
      detail ? h("div", { class: "detail" }, detail) : null,
      shot ? h("img", { src: fileUrl(sessionId, shot), alt: "Screenshot", loading: "lazy", onclick: () => lightbox(fileUrl(sessionId, shot)) }) : null,
    ),
  );
}

function describeAction(action) {
  if (!action || typeof action !== "object") return String(action ?? "action");
  const kind = action.type || action.action || "action";
  const rest = Object.entries(action)
    .filter(([key]) => key !== "type" && key !== "action")
    .map(([key, value]) => `${key} ${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(", ");
  return rest ? `${kind}: ${rest}` : kind;
}

function renderSteps() {
  if (!parts.steps || !current) return;
  const s = current.session;
  const items = [
    ...[...current.steps.values()].map((step) => ({ ts: step.ts, order: 0, step })),
    ...[...current.pages.values()].map((page) => ({ ts: page.ts, order: 1, page })),
  ].sort((a, b) => (a.ts === b.ts ? a.order - b.order : a.ts < b.ts ? -1 : 1));
  const list = h("ol", { id: "step-list" });
  const shown = current.shown || (current.shown = new Set());
  const mark = () => {
    // Only steps not shown before fade in; the list is rebuilt on every event.
    const node = list.lastChild;
    const key = list.childElementCount;
    if (!shown.has(key)) node.classList.add("new");
    shown.add(key);
  };
  for (const item of items) {
    if (item.page) {
      const d = item.page.data || {};
      if (d.error) list.append(stepView("error", `Failed ${hostOf(item.page.url)}`, d.error.message || d.error.code));
      else list.append(stepView("page", d.title || hostOf(d.final_url || item.page.url), `${d.status ?? ""} ${d.final_url || item.page.url}`.trim(), d.screenshot, s.session_id));
      mark();
      continue;
    }
    const { kind, data = {} } = item.step;
    if (kind === "visit" || kind === "navigate") list.append(stepView("visit", `Opening ${hostOf(data.url)}`, data.depth ? `depth ${data.depth}` : null));
    else if (kind === "note") list.append(stepView("skip", data.note, data.reasoning, data.screenshot, s.session_id));
    else if (kind === "skip") list.append(stepView("skip", `Skipped ${hostOf(data.url)}`, data.reason));
    else if (kind === "action") list.append(stepView("action", describeAction(data.action), data.reasoning, data.screenshot, s.session_id));
    else list.append(stepView(kind, kind, JSON.stringify(data).slice(0, 240), data.screenshot, s.session_id));
    mark();
  }
  const live = !FINAL.includes(s.state);
  if (!items.length) list.append(h("li", { class: "empty" }, live ? "Waiting for the first step…" : "No steps were recorded."));
  const count = h("span", { class: "pill" }, String(items.length));
  const wasAtBottom = parts.steps.querySelector("ol");
  const stick = !wasAtBottom || wasAtBottom.scrollTop + wasAtBottom.clientHeight >= wasAtBottom.scrollHeight - 30;
  parts.steps.replaceChildren(h("div", { class: "card-head" }, "Steps", h("span", { class: "spacer" }), count), list);
  if (stick) list.scrollTop = list.scrollHeight;
}

// ---------- results ----------
const TABS = [
  ["content", "Content", (d) => d.markdown !== undefined],
  ["markdown", "Markdown", (d) => d.markdown !== undefined],
  ["text", "Text", (d) => d.text !== undefined],
  ["links", "Links", (d) => Array.isArray(d.links)],
  ["tables", "Tables", (d) => Array.isArray(d.tables)],
  ["screenshot", "Screenshot", (d) => isRef(d.screenshot)],
  ["html", "HTML", (d) => d.html !== undefined],
];

function renderResults() {
  if (!parts.results || !current) return;
  const s = current.session;
  const pages = [...current.pages.values()].sort((a, b) => a.index - b.index);
  const children = [h("div", { class: "card-head" }, "Results", h("span", { class: "spacer" }), pages.length ? allDownloads(pages) : null)];
  if (s.result) children.push(resultSummary(s.result));
  if (!pages.length) {
    const agent = s.mode === "agent";
    const text = FINAL.includes(s.state)
      ? agent ? "The agent left no result." : "This run produced no pages."
      : agent ? "The agent's answer appears here when it is done." : "Pages appear here as they are scraped.";
    if (!s.result) children.push(h("div", { class: "pane" }, h("div", { class: "empty" }, text)));
    parts.results.replaceChildren(...children);
    return;
  }
  if (current.pageIndex === null || !current.pages.has(current.pageIndex)) current.pageIndex = pages[0].index;
  if (pages.length > 1) {
    children.push(
      h(
        "div",
        { class: "page-picker" },
        pages.map((p) =>
          h(
            "button",
            {
              class: "btn small",
              type: "button",
              "aria-pressed": String(p.index === current.pageIndex),
              title: p.url,
              onclick: () => {
                current.pageIndex = p.index;
                renderResults();
              },
            },
            (p.data && p.data.title) || hostOf(p.url),
          ),
        ),
      ),
    );
  }
  const page = current.pages.get(current.pageIndex);
  const d = page.data || {};
  children.push(
    h(
      "div",
      { class: "page-meta" },
      h("h3", { id: "page-title" }, d.title || hostOf(page.url)),
      d.status ? h("span", { class: d.status < 400 ? "pill ok" : "pill bad" }, `HTTP ${d.status}`) : null,
      h("a", { href: d.final_url || page.url, target: "_blank", rel: "noopener noreferrer" }, d.final_url || page.url),
      d.depth !== undefined ? h("span", { class: "pill" }, `depth ${d.depth}`) : null,
    ),
  );
  if (d.error) {
    children.push(h("div", { class: "pane" }, h("div", { class: "banner bad flush" }, `${d.error.code}: ${d.error.message}`)));
    parts.results.replaceChildren(...children);
    return;
  }
  const tabs = TABS.filter(([, , has]) => has(d));
  if (!tabs.some(([key]) => key === current.tab)) current.tab = tabs.length ? tabs[0][0] : null;
  const pane = h("div", { class: "pane", id: "result-pane" });
  children.push(
    h(
      "div",
      { class: "tabs", role: "tablist" },
      tabs.map(([key, label]) =>
        h(
          "button",
          {
            type: "button",
            role: "tab",
            "data-tab": key,
            "aria-selected": String(key === current.tab),
            onclick: () => {
              current.tab = key;
              renderResults();
            },
          },
          label,
          key === "links" ? h("span", { class: "count" }, d.links.length) : null,
          key === "tables" ? h("span", { class: "count" }, d.tables.length) : null,
        ),
      ),
    ),
    pane,
  );
  parts.results.replaceChildren(...children);
  fillPane(pane, s.session_id, page, current.tab);
}

function pageName(page, ext) {
  return `page-${String(page.index).padStart(3, "0")}-${hostOf(page.url).replace(/[^\w.-]+/g, "_").slice(0, 60)}.${ext}`;
}

async function fillPane(pane, sessionId, page, tab) {
  const d = page.data;
  const toolbar = (...buttons) => h("div", { class: "toolbar-row" }, buttons);
  try {
    if (tab === "content" || tab === "markdown" || tab === "text" || tab === "html") {
      const key = tab === "content" ? "markdown" : tab;
      const ext = { markdown: "md", text: "txt", html: "html" }[key];
      const text = await textOf(sessionId, d[key]);
      const save = h("button", { class: "btn small", type: "button", onclick: () => download(pageName(page, ext), text) }, `Download .${ext}`);
      const copy = h(
        "button",
        { class: "btn small", type: "button", onclick: () => navigator.clipboard.writeText(text).then(() => (copy.textContent = "Copied")) },
        "Copy",
      );
      const body = tab === "content" ? h("article", { class: "prose", id: "content" }, renderMarkdown(text)) : h("pre", { class: "raw" }, text);
      pane.replaceChildren(toolbar(save, copy), text.trim() ? body : h("div", { class: "empty" }, "Empty."));
    } else if (tab === "links") {
      const rows = d.links.map((link) =>
        h(
          "li",
          {},
          h("span", { class: "lt", title: link.text }, link.text || "—"),
          h("a", { href: link.url, target: "_blank", rel: "noopener noreferrer" }, link.url),
        ),
      );
      const text = d.links.map((l) => `${l.url}\t${l.text}`).join("\n") + "\n";
      pane.replaceChildren(
        toolbar(h("button", { class: "btn small", type: "button", onclick: () => download(pageName(page, "tsv"), text, "text/tab-separated-values") }, "Download .tsv")),
        rows.length ? h("ul", { class: "links" }, rows) : h("div", { class: "empty" }, "No links on this page."),
      );
    } else if (tab === "tables") {
      pane.replaceChildren(
        ...(d.tables.length
          ? d.tables.map((table, i) =>
              h(
                "div",
                { class: "table-block" },
                h("button", { class: "btn small", type: "button", onclick: () => download(pageName(page, `table${i + 1}.csv`), csv(table), "text/csv") }, "Download .csv"),
                h(
                  "table",
                  { class: "data" },
                  table.caption ? h("caption", {}, table.caption) : null,
                  table.headers && table.headers.length ? h("thead", {}, h("tr", {}, table.headers.map((c) => h("th", {}, c)))) : null,
                  h("tbody", {}, table.rows.map((row) => h("tr", {}, row.map((c) => h("td", {}, c))))),
                ),
              ),
            )
          : [h("div", { class: "empty" }, "No tables on this page.")]),
      );
    } else if (tab === "screenshot") {
      const src = fileUrl(sessionId, d.screenshot);
      pane.replaceChildren(
        toolbar(h("a", { class: "btn small", href: src, download: pageName(page, "png") }, "Download .png")),
        h("img", { class: "shot", id: "page-shot", src, alt: `Screenshot of ${page.url}`, onclick: () => lightbox(src) }),
      );
    }
  } catch (err) {
    pane.replaceChildren(h("div", { class: "banner bad flush" }, String(err.message || err)));
  }
}

function allDownloads(pages) {
  const sessionId = current.session.session_id;
  const everything = async (key) => {
    const parts = [];
    for (const page of pages) {
      const value = page.data && page.data[key];
      if (value === undefined) continue;
      const text = await textOf(sessionId, value);
      parts.push(key === "markdown" ? `<!-- ${page.data.final_url || page.url} -->\n\n${text}` : `# ${page.data.final_url || page.url}\n\n${text}`);
    }
    return parts.join("\n\n---\n\n");
  };
  const button = (label, key, ext) =>
    h(
      "button",
      { class: "btn small", type: "button", onclick: async () => download(`${sessionId}.${ext}`, await everything(key)) },
      label,
    );
  return h("span", { class: "head-actions" }, button("All Markdown", "markdown", "md"), button("All text", "text", "txt"));
}

function resultSummary(result) {
  const labels = { pages: "pages", failed_pages: "failed", skipped: "skipped", depth_reached: "depth reached", not_visited: "not visited", steps: "steps" };
  const stats = Object.entries(result)
    .filter(([, value]) => typeof value === "number")
    .map(([key, value]) => h("div", { class: "stat" }, h("b", {}, value), h("span", {}, labels[key] || key.replaceAll("_", " "))));
  const texts = Object.entries(result)
    .filter(([key, value]) => typeof value === "string" && key !== "start_url")
    .map(([key, value]) => h("div", { class: "banner note" }, h("b", {}, `${key.replaceAll("_", " ")}: `), value));
  return h("div", { id: "result-summary" }, h("div", { class: "summary-grid" }, stats), texts.length ? h("div", { class: "notes" }, texts) : null);
}

// ---------- start ----------
window.addEventListener("hashchange", () => current !== undefined && listNode && route());
if (config.signed_in) showApp();
else showSignIn();
