// logquant-gguf chat page: streams replies from /v1/chat/completions (SSE read with fetch and a
// ReadableStream, so the request can carry an API key and be aborted) and polls /logquant/stats.
// No framework and no build step: the server ships this file as it is.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), empty: $("empty"), notice: $("notice"),
  composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), togglePanel: $("toggle-panel"), panel: $("panel"),
  modelName: $("model-name"), kvBadge: $("kv-badge"),
  system: $("system-prompt"), temperature: $("temperature"), maxTokens: $("max-tokens"),
  apiKey: $("api-key"), apiKeyLabel: $("api-key-label"), settings: $("settings"),
};

const STORE = "logquant-chat";
const state = {
  history: [],        // [{role, content}] sent with every request; the system prompt is added then
  model: null,        // the server's model id, from /v1/models
  controller: null,   // AbortController of the reply being streamed
  pollTimer: null,
};

// ---------- settings kept in the browser ----------

function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    if (typeof saved.system === "string") ui.system.value = saved.system;
    if (saved.temperature != null) ui.temperature.value = saved.temperature;
    if (saved.maxTokens != null) ui.maxTokens.value = saved.maxTokens;
    if (typeof saved.apiKey === "string") ui.apiKey.value = saved.apiKey;
    const history = JSON.parse(sessionStorage.getItem(STORE + "-history") || "[]");
    if (Array.isArray(history)) history.forEach((m) => addMessage(m.role, m.content));
    state.history = Array.isArray(history) ? history : [];
  } catch (e) { /* corrupt storage: start fresh */ }
}

function saveSettings() {
  localStorage.setItem(STORE, JSON.stringify({
    system: ui.system.value, temperature: ui.temperature.value,
    maxTokens: ui.maxTokens.value, apiKey: ui.apiKey.value,
  }));
}

function saveHistory() {
  sessionStorage.setItem(STORE + "-history", JSON.stringify(state.history));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// ---------- rendering ----------

// Text to DOM without innerHTML: ``` fences become <pre><code>, `spans` become <code>.
function renderRich(container, text) {
  container.replaceChildren();
  const parts = text.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      const nl = part.indexOf("\n");
      const lang = nl >= 0 ? part.slice(0, nl).trim() : "";
      const body = nl >= 0 && /^[\w+#.-]*$/.test(lang) ? part.slice(nl + 1) : part;
      if (lang && body !== part) code.dataset.lang = lang;
      // An unclosed last fence may end in the first backticks of its closing fence.
      const open = i === parts.length - 1;
      code.textContent = (open ? body.replace(/\n?`{1,2}$/, "") : body).replace(/\n$/, "");
      pre.appendChild(code);
      container.appendChild(pre);
      return;
    }
    part.split(/\n{2,}/).forEach((para) => {
      if (!para.trim()) return;
      const p = document.createElement("p");
      para.replace(/^\n+|\n+$/g, "").split(/(`[^`\n]+`)/).forEach((bit) => {
        if (bit.length > 2 && bit.startsWith("`") && bit.endsWith("`")) {
          const c = document.createElement("code");
          c.textContent = bit.slice(1, -1);
          p.appendChild(c);
        } else if (bit) {
          p.appendChild(document.createTextNode(bit));
        }
      });
      container.appendChild(p);
    });
  });
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollDown(force) {
  if (force || nearBottom()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const el = document.createElement("div");
  el.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("div");
  meta.className = "meta";
  el.append(who, body, meta);
  ui.messages.appendChild(el);
  setText(el, text || "");
  scrollDown(true);
  return el;
}

function setText(el, text) {
  const body = el.querySelector(".body");
  if (el.classList.contains("assistant")) renderRich(body, text);
  else body.textContent = text;
}

function showNotice(text) {
  ui.notice.textContent = text || "";
  ui.notice.hidden = !text;
}

function setStreaming(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  ui.prompt.disabled = false;
  schedulePoll(on ? 700 : 2000);
}

// ---------- statistics ----------

function fmtBytes(n) {
  if (n == null || isNaN(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function fmtNum(n, digits) {
  return n == null || isNaN(n) ? "—" : Number(n).toFixed(digits);
}

function showStats(s) {
  const tokens = s.busy ? s.live_tokens : s.tokens;
  $("stat-kv-type").textContent = s.kv_type ?? "—";
  ui.kvBadge.textContent = "kv " + (s.kv_type ?? "—");
  $("stat-tokens").textContent = tokens ?? "—";
  $("stat-n-ctx").textContent = s.n_ctx ?? "—";
  $("stat-fill").style.width = s.n_ctx ? Math.min(100, 100 * (tokens || 0) / s.n_ctx) + "%" : "0";
  $("stat-bytes").textContent = fmtBytes(s.bytes_total);
  $("stat-bpt").textContent = fmtBytes(s.bytes_per_token);
  $("stat-bits").textContent = fmtNum(s.bits_per_value, 2);
  $("stat-busy").hidden = !s.busy;
  const tiers = s.tiers && typeof s.tiers === "object" ? Object.entries(s.tiers) : [];
  const table = $("stat-tiers");
  table.hidden = tiers.length === 0;
  const tbody = table.querySelector("tbody");
  tbody.replaceChildren();
  for (const [name, value] of tiers) {
    const tr = document.createElement("tr");
    const a = document.createElement("td");
    const b = document.createElement("td");
    a.textContent = name;
    b.textContent = value && typeof value === "object"
      ? Object.entries(value).map(([k, v]) => `${k} ${typeof v === "number" && !Number.isInteger(v) ? v.toFixed(2) : v}`).join(", ")
      : String(value);
    tr.append(a, b);
    tbody.appendChild(tr);
  }
}

async function pollStats() {
  if (document.hidden) return;
  try {
    const r = await fetch("logquant/stats", { headers: headers() });
    if (r.status === 401) { needKey(); return; }
    if (r.ok) showStats(await r.json());
  } catch (e) { /* server restarting: try again at the next tick */ }
}

function schedulePoll(ms) {
  clearInterval(state.pollTimer);
  state.pollTimer = setInterval(pollStats, ms);
}

function showSpeed(run) {
  const secs = (run.last - run.first) / 1000;
  $("stat-tps").textContent = run.pieces > 1 && secs > 0 ? fmtNum((run.pieces - 1) / secs, 1) : "—";
  $("stat-ttft").textContent = run.first ? fmtNum(run.first - run.start, 0) : "—";
  $("stat-reply-tokens").textContent = run.pieces;
}

// ---------- server ----------

function needKey() {
  ui.apiKeyLabel.classList.add("attention");
  showNotice("This server needs an API key: enter it under Settings.");
  ui.panel.classList.remove("hidden");
  ui.settings.open = true;
}

async function connect() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    if (r.status === 401) { needKey(); return; }
    const data = await r.json();
    state.model = data.data?.[0]?.id ?? null;
    ui.modelName.textContent = state.model ?? "no model";
    ui.apiKeyLabel.classList.remove("attention");
    showNotice("");
    pollStats();
  } catch (e) {
    ui.modelName.textContent = "server unreachable";
  }
}

async function errorText(r) {
  try {
    const body = await r.json();
    return body.error?.message || JSON.stringify(body.detail ?? body);
  } catch (e) {
    return `HTTP ${r.status}`;
  }
}

// Yields each SSE event's data: events end at a blank line; lines starting ":" are comments.
async function* sseData(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) {
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  } finally {
    if (signal.aborted) reader.cancel().catch(() => {});
  }
}

async function send(text) {
  showNotice("");
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");

  const messages = [];
  if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value.trim() });
  messages.push(...state.history);
  const request = {
    messages, stream: true,
    temperature: Number(ui.temperature.value) || 0,
    max_tokens: Math.max(1, parseInt(ui.maxTokens.value, 10) || 512),
  };
  if (state.model) request.model = state.model;

  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  const run = { start: performance.now(), first: 0, last: 0, pieces: 0 };
  let content = "";
  let finish = null;
  let frame = 0;
  const paint = () => { frame = 0; setText(reply, content); scrollDown(false); showSpeed(run); };

  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!r.ok) {
      if (r.status === 401) needKey();
      throw new Error(await errorText(r));
    }
    for await (const data of sseData(r, controller.signal)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "generation failed");
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      const piece = choice.delta?.content;
      if (piece == null || (piece === "" && choice.finish_reason)) continue;
      const now = performance.now();
      if (!run.first) run.first = now;
      run.last = now;
      run.pieces += 1;  // one chunk per generated token
      content += piece;
      if (!frame) frame = requestAnimationFrame(paint);
    }
    if (!content && !finish) {
      throw new Error("The server ended the reply without any text. The conversation may no " +
                      "longer fit in the context: start a New chat.");
    }
    reply.querySelector(".meta").textContent = finish === "length" ? "stopped at max tokens" : "";
  } catch (e) {
    if (controller.signal.aborted) {
      reply.querySelector(".meta").textContent = "stopped";
    } else {
      state.history.pop();          // the request failed: keep history as the server last saw it
      reply.classList.add("error");
      setText(reply, e.message || String(e));
      ui.prompt.value = ui.prompt.value || text;
      resizePrompt();
      content = null;
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    if (content) {
      setText(reply, content);
      state.history.push({ role: "assistant", content });
    } else if (content === "") {
      state.history.pop();          // stopped before any text: forget the question too
    }
    showSpeed(run);
    reply.classList.remove("streaming");
    reply.dataset.done = "true";
    state.controller = null;
    saveHistory();
    setStreaming(false);
    pollStats();
    ui.prompt.focus();
  }
}

// ---------- wiring ----------

function resizePrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, 220) + "px";
}

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || state.controller) return;
  ui.prompt.value = "";
  resizePrompt();
  send(text);
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.prompt.addEventListener("input", resizePrompt);
ui.stop.addEventListener("click", () => state.controller?.abort());
ui.newChat.addEventListener("click", () => {
  state.controller?.abort();
  state.history = [];
  saveHistory();
  ui.messages.querySelectorAll(".msg").forEach((el) => el.remove());
  ui.empty.hidden = false;
  showNotice("");
  ui.prompt.focus();
});
ui.togglePanel.addEventListener("click", () => {
  const hidden = ui.panel.classList.toggle("hidden");
  ui.togglePanel.setAttribute("aria-expanded", String(!hidden));
});
for (const input of [ui.system, ui.temperature, ui.maxTokens]) input.addEventListener("change", saveSettings);
ui.apiKey.addEventListener("change", () => { saveSettings(); connect(); });
document.addEventListener("visibilitychange", () => { if (!document.hidden) pollStats(); });

if (window.matchMedia("(max-width: 820px)").matches) ui.panel.classList.add("hidden");
loadSettings();
connect();
schedulePoll(2000);
ui.prompt.focus();
