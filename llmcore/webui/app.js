// The chat page of `llmcore serve`. Plain JavaScript, no build step, no network but this server.
// Safety rule: model and user text only ever reaches the page through textContent / text nodes;
// nothing here assigns innerHTML or builds markup from strings.
"use strict";

(function () {
  const KEY_STORE = "llmcore.apiKey"; // sessionStorage: this tab only, gone when it closes
  const $ = (id) => document.getElementById(id);
  const el = {
    info: $("model-info"), messages: $("messages"), error: $("error"), composer: $("composer"),
    prompt: $("prompt"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
    keyForm: $("key-form"), keyInput: $("api-key"), temperature: $("temperature"), topP: $("top-p"),
    maxTokens: $("max-tokens"), thinking: $("thinking"), system: $("system"), usage: $("usage"),
  };

  let info = null;       // /ui/info
  let history = [];      // [{role, content, tool_calls?}] sent with every request
  let controller = null; // AbortController of the answer being streamed

  // -- the API key ------------------------------------------------------------------------------
  let memoryKey = "";
  function apiKey() {
    try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (e) { return memoryKey; }
  }
  function setApiKey(k) {
    memoryKey = k;
    try { sessionStorage.setItem(KEY_STORE, k); } catch (e) { /* storage off: memory only */ }
  }
  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const k = apiKey();
    if (k) h["Authorization"] = "Bearer " + k;
    return h;
  }

  // -- errors -----------------------------------------------------------------------------------
  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = false;
  }
  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }
  async function errorText(res) {
    // The server's OpenAI-style {"error": {"message"}}; anything else as plain text.
    let msg = "";
    try {
      const raw = await res.text();
      try {
        const body = JSON.parse(raw);
        msg = (body && body.error && (body.error.message || body.error)) || body.detail || raw;
        if (typeof msg !== "string") msg = JSON.stringify(msg);
      } catch (e) { msg = raw; }
    } catch (e) { msg = ""; }
    return "Error " + res.status + (res.statusText ? " " + res.statusText : "") + (msg ? ": " + msg.slice(0, 500) : "");
  }
  function needKey(text) {
    el.keyForm.hidden = false;
    showError(text);
    el.keyInput.focus();
  }

  // -- server info ------------------------------------------------------------------------------
  async function loadInfo() {
    let res;
    try {
      res = await fetch("/ui/info", { headers: headers(false), cache: "no-store" });
    } catch (e) {
      el.info.textContent = "server unreachable";
      showError("Cannot reach the server: " + e.message);
      return false;
    }
    if (res.status === 401) {
      el.info.textContent = "API key needed";
      needKey(await errorText(res));
      return false;
    }
    if (!res.ok) {
      showError(await errorText(res));
      return false;
    }
    info = await res.json();
    el.keyForm.hidden = true;
    clearError();
    el.info.textContent = "model " + info.model + " \u00b7 " + info.device + " \u00b7 context " + info.context_length +
      " tokens" + (info.rag ? " \u00b7 RAG" : "");
    el.info.title = el.info.textContent;
    el.thinking.checked = !!info.thinking;
    el.thinking.disabled = !info.thinking_available;
    el.thinking.parentElement.title = info.thinking_available ? "" : "this model's chat template has no thinking mode";
    const mt = parseInt(el.maxTokens.value, 10);
    el.maxTokens.max = String(info.context_length);
    if (mt > info.context_length) el.maxTokens.value = String(Math.floor(info.context_length / 2));
    return true;
  }

  // -- safe markdown: paragraphs, **bold**, `code`, fenced code, lists, headings ----------------
  function inline(parent, text) {
    const re = /`([^`\n]+)`|\*\*([^\n]+?)\*\*/g;
    let last = 0, m;
    const plain = (s) => {
      const lines = s.split("\n");
      lines.forEach((line, i) => {
        if (i) parent.appendChild(document.createElement("br"));
        if (line) parent.appendChild(document.createTextNode(line));
      });
    };
    while ((m = re.exec(text)) !== null) {
      plain(text.slice(last, m.index));
      const node = document.createElement(m[1] !== undefined ? "code" : "strong");
      node.textContent = m[1] !== undefined ? m[1] : m[2];
      parent.appendChild(node);
      last = re.lastIndex;
    }
    plain(text.slice(last));
  }

  function markdown(container, text) {
    container.replaceChildren();
    const lines = text.split("\n");
    let i = 0;
    const isFence = (l) => /^\s*```/.test(l);
    const bullet = /^\s*[-*+]\s+(.*)$/, numbered = /^\s*\d+[.)]\s+(.*)$/, heading = /^\s{0,3}(#{1,6})\s+(.*)$/;
    while (i < lines.length) {
      const line = lines[i];
      if (isFence(line)) {
        const lang = line.trim().slice(3).trim();
        const body = [];
        i++;
        while (i < lines.length && !isFence(lines[i])) body.push(lines[i++]);
        i++; // the closing fence (or past the end while it streams)
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        if (lang) code.dataset.lang = lang.slice(0, 40);
        code.textContent = body.join("\n");
        pre.appendChild(code);
        container.appendChild(pre);
      } else if (!line.trim()) {
        i++;
      } else if (bullet.test(line) || numbered.test(line)) {
        const re = bullet.test(line) ? bullet : numbered;
        const list = document.createElement(re === bullet ? "ul" : "ol");
        while (i < lines.length && re.test(lines[i])) {
          const li = document.createElement("li");
          inline(li, lines[i].match(re)[1]);
          list.appendChild(li);
          i++;
        }
        container.appendChild(list);
      } else if (heading.test(line)) {
        const p = document.createElement("p");
        const strong = document.createElement("strong");
        inline(strong, line.match(heading)[2]);
        p.appendChild(strong);
        container.appendChild(p);
        i++;
      } else {
        const para = [];
        while (i < lines.length && lines[i].trim() && !isFence(lines[i]) && !bullet.test(lines[i]) &&
               !numbered.test(lines[i]) && !heading.test(lines[i])) para.push(lines[i++]);
        const p = document.createElement("p");
        inline(p, para.join("\n"));
        container.appendChild(p);
      }
    }
  }

  // -- messages ---------------------------------------------------------------------------------
  function scrollDown() { el.messages.scrollTop = el.messages.scrollHeight; }
  // Whether the reader is at the end of the conversation (a streaming answer keeps them there; someone
  // who scrolled up to read is left where they are).
  function atEnd() { return el.messages.scrollHeight - el.messages.scrollTop - el.messages.clientHeight < 40; }

  function addUser(text) {
    const div = document.createElement("div");
    div.className = "msg user";
    div.textContent = text;
    el.messages.appendChild(div);
    scrollDown();
    return div;
  }

  function addAssistant() {
    const div = document.createElement("div");
    div.className = "msg assistant streaming";
    div.dataset.deltas = "0";
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = info ? info.model : "assistant";
    const details = document.createElement("details");
    details.className = "reasoning";
    details.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const reasoning = document.createElement("div");
    reasoning.className = "reasoning-text";
    details.append(summary, reasoning);
    const tools = document.createElement("div");
    tools.className = "tool-calls";
    const answer = document.createElement("div");
    answer.className = "answer";
    const status = document.createElement("div");
    status.className = "status";
    div.append(role, details, answer, tools, status);
    el.messages.appendChild(div);
    scrollDown();
    return { div, details, summary, reasoning, answer, tools, status };
  }

  // Splits streamed content into reasoning and answer when the server passes a think block through
  // as text: `<think>...</think>answer`, or `...</think>answer` after a prompt that opened it.
  function splitThink(raw, thinkingOn) {
    const open = raw.indexOf("<think>");
    if (open !== -1 && !raw.slice(0, open).trim()) {
      const close = raw.indexOf("</think>", open);
      if (close === -1) return { reasoning: raw.slice(open + 7), answer: "", thinking: true };
      return { reasoning: raw.slice(open + 7, close), answer: raw.slice(close + 8), thinking: false };
    }
    const close = raw.indexOf("</think>");
    if (thinkingOn && close !== -1) return { reasoning: raw.slice(0, close), answer: raw.slice(close + 8), thinking: false };
    return { reasoning: "", answer: raw, thinking: false };
  }

  // `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks left in the text (a request without
  // `tools`, or another server): shown as tool calls. A block that is not such JSON stays text, as the
  // server's own parser leaves it (llmcore.chat_format).
  function splitToolText(answer) {
    const calls = [];
    const text = answer.replace(/<tool_call>\s*([\s\S]*?)\s*<\/tool_call>/g, (block, body) => {
      let obj = null;
      try { obj = JSON.parse(body); } catch (e) { return block; }
      const args = obj && obj.arguments === undefined ? {} : obj && obj.arguments;
      if (!obj || typeof obj !== "object" || typeof obj.name !== "string" || !obj.name ||
          args === null || typeof args !== "object" || Array.isArray(args)) return block;
      calls.push({ name: obj.name, arguments: args });
      return "";
    });
    return { text, calls };
  }

  function isJsonObject(text) {
    try { const v = JSON.parse(text); return v !== null && typeof v === "object" && !Array.isArray(v); } catch (e) { return false; }
  }

  function pretty(args) {
    if (typeof args !== "string") return JSON.stringify(args, null, 2);
    try { return JSON.stringify(JSON.parse(args), null, 2); } catch (e) { return args; }
  }

  function renderTools(container, calls) {
    container.replaceChildren();
    for (const c of calls) {
      const box = document.createElement("div");
      box.className = "tool-call";
      const head = document.createElement("div");
      const label = document.createTextNode("tool call ");
      const name = document.createElement("span");
      name.className = "tool-name";
      name.textContent = c.name;
      head.append(label, name);
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = pretty(c.arguments);
      pre.appendChild(code);
      box.append(head, pre);
      container.appendChild(box);
    }
  }

  // -- one turn ---------------------------------------------------------------------------------
  function numberOr(input, fallback) {
    const v = parseFloat(input.value);
    return Number.isFinite(v) ? v : fallback;
  }

  function requestBody() {
    const messages = [];
    const system = el.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const m of history) messages.push(m);
    const body = {
      model: info ? info.model : undefined, messages, stream: true, stream_options: { include_usage: true },
      temperature: numberOr(el.temperature, 0.7), top_p: numberOr(el.topP, 0.9),
      max_tokens: Math.max(1, Math.round(numberOr(el.maxTokens, 512))),
    };
    // Thinking is sent only when it differs from the server's own setting (--thinking).
    if (info && info.thinking_available && el.thinking.checked !== !!info.thinking) {
      body.chat_template_kwargs = { enable_thinking: el.thinking.checked };
    }
    return body;
  }

  function setBusy(busy) {
    el.send.disabled = busy;
    el.stop.disabled = !busy;
  }

  async function send() {
    const text = el.prompt.value;
    if (!text.trim() || controller) return;
    if (!info) {
      const ok = await loadInfo();
      if (!ok) return;
    }
    clearError();
    el.prompt.value = "";
    history.push({ role: "user", content: text });
    const userDiv = addUser(text);
    const view = addAssistant();
    controller = new AbortController();
    const mine = controller;
    setBusy(true);

    let raw = "", reasoningDelta = "", finish = null, usage = null, done = false, failed = null;
    const toolCalls = []; // by index: {id, name, arguments (string)}
    let answerText = "", pending = false;
    const thinkingOn = !!(info && info.thinking_available && el.thinking.checked);

    function render() {
      pending = false;
      const follow = atEnd();
      const t = splitThink(raw, thinkingOn);
      const reasoning = reasoningDelta + t.reasoning;
      const tt = splitToolText(t.answer);
      answerText = tt.text;
      if (reasoning) {
        view.details.hidden = false;
        view.reasoning.textContent = reasoning;
        view.summary.textContent = (t.thinking || (!answerText && !done)) ? "Thinking\u2026" : "Thinking";
      }
      markdown(view.answer, answerText);
      const calls = toolCalls.filter(Boolean).map((c) => ({ name: c.name, arguments: c.arguments }));
      renderTools(view.tools, calls.concat(tt.calls));
      if (follow) scrollDown();
    }
    function schedule() {
      if (!pending) { pending = true; requestAnimationFrame(render); }
    }

    function onChunk(obj) {
      if (obj.error) {
        failed = "Error from the server: " + (obj.error.message || JSON.stringify(obj.error));
        return;
      }
      if (obj.usage) usage = obj.usage;
      const choice = obj.choices && obj.choices[0];
      if (!choice) return;
      const d = choice.delta || {};
      let got = false;
      if (typeof d.reasoning_content === "string" && d.reasoning_content) { reasoningDelta += d.reasoning_content; got = true; }
      if (typeof d.content === "string" && d.content) { raw += d.content; got = true; }
      if (Array.isArray(d.tool_calls)) {
        for (const tc of d.tool_calls) {
          const idx = Number.isInteger(tc.index) ? tc.index : toolCalls.length;
          const slot = toolCalls[idx] || (toolCalls[idx] = { id: "", name: "", arguments: "" });
          if (tc.id) slot.id = tc.id;
          const f = tc.function || {};
          if (f.name) slot.name += f.name;
          if (f.arguments !== undefined && f.arguments !== null) {
            slot.arguments += typeof f.arguments === "string" ? f.arguments : JSON.stringify(f.arguments);
          }
        }
        got = true;
      }
      if (got) view.div.dataset.deltas = String(parseInt(view.div.dataset.deltas, 10) + 1);
      if (choice.finish_reason) finish = choice.finish_reason;
      schedule();
    }

    const unsent = (msg, status) => { // the turn was not answered: it is not history, the text comes back
      history.pop();
      userDiv.classList.add("unsent");
      view.div.remove();
      el.prompt.value = text;
      if (status === 401) needKey(msg); else showError(msg);
    };
    try {
      let res;
      try {
        res = await fetch("/v1/chat/completions", {
          method: "POST", headers: headers(true), body: JSON.stringify(requestBody()), signal: mine.signal,
        });
      } catch (e) {
        if (e && e.name === "AbortError") throw e;
        unsent("Cannot reach the server: " + (e && e.message ? e.message : e), 0);
        return;
      }
      if (!res.ok) {
        unsent(await errorText(res), res.status);
        return;
      }
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      while (!done && !failed) {
        const { value, done: eof } = await reader.read();
        if (eof) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) !== -1) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (!data) continue;
          if (data === "[DONE]") { done = true; break; }
          try { onChunk(JSON.parse(data)); } catch (e) { failed = "Unreadable answer from the server: " + data.slice(0, 200); }
          if (failed) break;
        }
      }
      if (!done && !failed) failed = "The connection closed before the answer was complete.";
    } catch (e) {
      if (e && e.name === "AbortError") {
        finish = "stopped";
      } else {
        failed = "The connection to the server was lost: " + (e && e.message ? e.message : e);
      }
    } finally {
      if (controller === mine) controller = null;
      setBusy(false);
    }
    if (userDiv.classList.contains("unsent")) return;
    const follow = atEnd();
    render();
    view.div.classList.remove("streaming");
    view.summary.textContent = "Thinking";
    // Only whole calls go back as history (a stopped stream may leave half the arguments).
    const calls = toolCalls.filter((c) => c && c.name && isJsonObject(c.arguments));
    const turn = { role: "assistant", content: answerText };
    if (calls.length) {
      turn.tool_calls = calls.map((c, i) => ({ id: c.id || "call_" + i, type: "function",
        function: { name: c.name, arguments: c.arguments } }));
    }
    history.push(turn); // a stopped or broken answer keeps what arrived
    const parts = [];
    if (failed) parts.push(failed);
    if (finish === "stopped") parts.push("stopped");
    else if (finish === "length") parts.push("cut at max tokens");
    else if (finish === "tool_calls") parts.push("tool calls");
    if (usage) {
      parts.push(usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens");
      el.usage.textContent = "last answer: " + usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens";
    }
    view.status.textContent = parts.join(" \u00b7 ");
    if (usage) view.div.dataset.promptTokens = String(usage.prompt_tokens);
    if (finish) view.div.dataset.finish = finish;
    if (failed) {
      view.status.classList.add("failed");
      showError(failed);
    }
    view.div.dataset.done = "1";
    if (follow) scrollDown();
  }

  function stop() {
    if (controller) controller.abort();
  }

  function newChat() {
    stop();
    history = [];
    el.messages.replaceChildren();
    el.usage.textContent = "";
    clearError();
    el.prompt.focus();
  }

  // -- wiring -----------------------------------------------------------------------------------
  el.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  el.stop.addEventListener("click", stop);
  el.newChat.addEventListener("click", newChat);
  el.keyForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    setApiKey(el.keyInput.value.trim());
    el.keyInput.value = "";
    await loadInfo();
  });

  // Read-only view for tests and the console.
  window.llmcoreChat = { history: () => JSON.parse(JSON.stringify(history)), info: () => info };
  loadInfo();
})();
